//! TorchScript test models: traced in Rust (a channel-mean model whose answer is known, a ResNet-18
//! with random weights) or scripted with Debian's PyTorch for behaviour a trace cannot capture. Each
//! kind is made once per test process, into a folder of its own under cargo's test temp folder, and
//! copied to where a test wants it: a test may overwrite its copy, never the original.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use tch::nn::{self, Module, ModuleT};
use tch::{CModule, Device, Kind, Tensor};

/// This process's model folder; those of earlier runs are removed when it is made.
fn folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-models");
        for old in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let pid = old.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    })
}

/// The model `name` (a file name in this process's model folder), made by `make` the first time.
fn made_once(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    static MADE: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let cell = MADE.get_or_init(Mutex::default).lock().unwrap().entry(name.to_string()).or_default().clone();
    cell.get_or_init(|| {
        let file = folder().join(name);
        make(&file);
        file
    })
    .clone()
}

fn copy_to(model: &Path, path: &Path) {
    std::fs::copy(model, path).unwrap_or_else(|e| panic!("copy {} to {}: {e}", model.display(), path.display()));
}

/// A 1000-class model whose logits are 10 × the per-channel mean of the normalized input in classes
/// 0, 1, 2 (and 0 elsewhere): a red image is class 0 ("tench"), green is 1 ("goldfish"), blue is 2
/// ("great white shark"). Accepts any batch size.
pub fn channel_mean_model(path: &Path) {
    channel_mean_model_to(path, [0, 1, 2]);
}

/// Like `channel_mean_model`, with the red, green and blue means going to `classes`.
pub fn channel_mean_model_to(path: &Path, classes: [usize; 3]) {
    let name = format!("channel-mean-{}-{}-{}.pt", classes[0], classes[1], classes[2]);
    copy_to(&made_once(&name, |file| trace_channel_mean(file, classes)), path);
}

fn trace_channel_mean(path: &Path, classes: [usize; 3]) {
    let mut w = vec![0f32; 3 * 1000];
    for c in 0..3 {
        w[c * 1000 + classes[c]] = 10.0;
    }
    let weight = Tensor::from_slice(&w).view([3, 1000]);
    let example = Tensor::zeros([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let m = CModule::create_by_tracing("ChannelMean", "forward", &[example], &mut |xs| {
        vec![xs[0].mean_dim([2i64, 3].as_slice(), false, Kind::Float).matmul(&weight)]
    })
    .expect("trace channel-mean model");
    m.save(path).expect("save channel-mean model");
}

/// ResNet-18 (torchvision layout, random weights) with a batch-size-independent head, traced.
pub fn resnet18_model(path: &Path) {
    copy_to(&made_once("resnet18.pt", trace_resnet18), path);
}

fn trace_resnet18(path: &Path) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root());
    vs.freeze();
    let example = Tensor::zeros([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let m = CModule::create_by_tracing("ResNet18", "forward", &[example], &mut |xs| vec![net.forward_t(&xs[0], false)])
        .expect("trace resnet18");
    m.save(path).expect("save resnet18");
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding, bias: false, ..Default::default() })
}

fn block(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    let conv1 = conv(&p / "conv1", c_in, c_out, 3, 1, stride);
    let bn1 = nn::batch_norm2d(&p / "bn1", c_out, Default::default());
    let conv2 = conv(&p / "conv2", c_out, c_out, 3, 1, 1);
    let bn2 = nn::batch_norm2d(&p / "bn2", c_out, Default::default());
    let down = (stride != 1 || c_in != c_out).then(|| {
        (conv(&p / "downsample" / "0", c_in, c_out, 1, 0, stride), nn::batch_norm2d(&p / "downsample" / "1", c_out, Default::default()))
    });
    nn::func_t(move |xs, train| {
        let ys = xs.apply(&conv1).apply_t(&bn1, train).relu().apply(&conv2).apply_t(&bn2, train);
        let skip = match &down {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        (skip + ys).relu()
    })
}

fn layer(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    nn::seq_t().add(block(&p / "0", c_in, c_out, stride)).add(block(&p / "1", c_out, c_out, 1))
}

fn resnet18(p: &nn::Path) -> impl ModuleT + use<> {
    let conv1 = conv(p / "conv1", 3, 64, 7, 3, 2);
    let bn1 = nn::batch_norm2d(p / "bn1", 64, Default::default());
    let (l1, l2, l3, l4) =
        (layer(p / "layer1", 64, 64, 1), layer(p / "layer2", 64, 128, 2), layer(p / "layer3", 128, 256, 2), layer(p / "layer4", 256, 512, 2));
    let fc = nn::linear(p / "fc", 512, 1000, Default::default());
    nn::func_t(move |xs, train| {
        let x = xs
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
            .apply_t(&l1, train)
            .apply_t(&l2, train)
            .apply_t(&l3, train)
            .apply_t(&l4, train)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1);
        fc.forward(&x)
    })
}

/// A channel-mean model (red → class 0, green → 1, blue → 2) scripted with Debian's PyTorch, for
/// behaviour a trace cannot capture: its `forward` first runs `prelude` (TorchScript, indented 8 spaces;
/// `x` is the input batch, `self.calls` counts forward calls, the load-time checks included).
pub fn scripted_channel_mean(path: &Path, prelude: &str) {
    let name = format!("scripted-{:016x}.pt", xxhash_rust::xxh3::xxh3_64(prelude.as_bytes()));
    copy_to(&made_once(&name, |file| script_channel_mean(file, prelude)), path);
}

fn script_channel_mean(path: &Path, prelude: &str) {
    let script = format!(
        r#"
import sys, torch
class Scripted(torch.nn.Module):
    calls: int
    def __init__(self):
        super().__init__()
        w = torch.zeros(3, 1000)
        for c in range(3):
            w[c, c] = 10.0
        self.register_buffer("w", w)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
{prelude}
        return x.mean([2, 3]) @ self.w
torch.jit.script(Scripted()).save(sys.argv[1])
"#
    );
    // TorchScript reads the class's source, so the script must be a file.
    let py = path.with_extension("py");
    std::fs::write(&py, script).unwrap();
    let out = Command::new("/usr/bin/python3").arg(&py).arg(path).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "cannot script the model: {}", String::from_utf8_lossy(&out.stderr));
}

/// A channel-mean model whose forward pass never returns for a bright image (mean of the normalized
/// input above 1.5, e.g. white): a hung worker.
pub fn hanging_model(path: &Path) {
    scripted_channel_mean(path, "        m = x.mean()\n        while bool(m > 1.5):\n            m = m * 1.0");
}

/// ONNX test models, exported from tiny PyTorch modules with Debian's PyTorch (`torch.onnx.export`,
/// opset 13; input "input", output "logits", a dynamic batch axis unless the kind says otherwise):
/// - `channel_mean`: the channel-mean model (red → class 0, green → 1, blue → 2), NCHW;
/// - `channel_mean_nhwc`: the same on `[N, 224, 224, 3]` input;
/// - `shifted`: the channel-mean model with red → 7, green → 8, blue → 9;
/// - `batch1`: the channel-mean model with its batch fixed at 1;
/// - `nan_on_bright`: NaN logits for a bright image (mean of the normalized input above 1.5: white);
/// - `fails_on_bright`: ONNX Runtime raises on a bright image (a Gather index out of bounds);
/// - `output_rank3`: logits shaped `[N, 1000, 1]`;
/// - `input_112`: input `[N, 3, 112, 112]`; `input_flat`: input `[N, 150528]`;
/// - `ten_classes`: 10 logits per image.
pub fn onnx_model(path: &Path, kind: &str) {
    copy_to(&made_once(&format!("{kind}.onnx"), |file| export_onnx(file, kind)), path);
}

fn export_onnx(path: &Path, kind: &str) {
    const SCRIPT: &str = r#"
import sys, warnings, torch
kind, out = sys.argv[1], sys.argv[2]
def weights(classes, n=1000):
    w = torch.zeros(3, n)
    for c, k in enumerate(classes):
        w[c, k] = 10.0
    return w
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", weights([7, 8, 9] if kind == "shifted" else [0, 1, 2], 10 if kind == "ten_classes" else 1000))
    def forward(self, x):
        if kind == "channel_mean_nhwc":
            return x.mean([1, 2]) @ self.w
        if kind == "input_flat":
            x = x.reshape(x.shape[0], 3, 224, 224)
        y = x.mean([2, 3]) @ self.w
        bright = (x.mean([1, 2, 3]) > 1.5).float().unsqueeze(1)
        if kind == "nan_on_bright":
            return y + torch.log(1.0 - bright * 2.0)
        if kind == "fails_on_bright":
            index = torch.arange(1000) + (bright.max() * 5000.0).long()
            return torch.index_select(y, 1, index)
        if kind == "output_rank3":
            return y.unsqueeze(2)
        return y
shape = {"channel_mean_nhwc": (1, 224, 224, 3), "input_112": (1, 3, 112, 112), "input_flat": (1, 3 * 224 * 224)}.get(kind, (1, 3, 224, 224))
axes = {} if kind == "batch1" else {"input": {0: "batch"}, "logits": {0: "batch"}}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(Model().eval(), torch.zeros(*shape), out, input_names=["input"], output_names=["logits"],
                      dynamic_axes=axes, opset_version=13)
"#;
    let out = Command::new("/usr/bin/python3").args(["-c", SCRIPT, kind]).arg(path).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "cannot export the {kind} ONNX model: {}", String::from_utf8_lossy(&out.stderr));
}
