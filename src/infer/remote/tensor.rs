//! What travels: the batch as the server's input tensor and its logits back, and the check at start
//! that the server's model takes what labeld sends and returns what labeld expects. No I/O here.

use super::proto::model_metadata_response::TensorMetadata;
use super::proto::{ModelInferResponse, ModelMetadataResponse};

/// How the server's model lays out an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[n, 3, crop, crop]`: what PyTorch exports.
    Nchw,
    /// `[n, crop, crop, 3]`: labeld's own layout, sent as is.
    Nhwc,
}

/// The server's model, as checked against what labeld sends and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub input: String,
    pub output: String,
    pub layout: Layout,
}

/// Checks the model metadata a server gave against labeld's images (`crop`×`crop`, 3 channels, FP32,
/// any batch size) and `classes` logits per image; the error names what labeld sends or expects and
/// what the server says.
pub fn check(meta: &ModelMetadataResponse, crop: u32, classes: usize) -> Result<Signature, String> {
    let shape = |t: &TensorMetadata| format!("{} {:?}", t.datatype, t.shape);
    let [input] = meta.inputs.as_slice() else {
        let names: Vec<&str> = meta.inputs.iter().map(|t| t.name.as_str()).collect();
        return Err(format!("labeld sends one input tensor; the server's model has {} ({})", names.len(), names.join(", ")));
    };
    let sends = format!("labeld sends FP32 [-1, 3, {crop}, {crop}] (or [-1, {crop}, {crop}, 3])");
    if input.datatype != "FP32" {
        return Err(format!("{sends}; the server's input \"{}\" is {}", input.name, shape(input)));
    }
    let fits = |dim: i64, want: i64| dim == -1 || dim == want;
    let c = i64::from(crop);
    let layout = match input.shape.as_slice() {
        [b, 3, h, w] if fits(*b, -1) && fits(*h, c) && fits(*w, c) => Layout::Nchw,
        [b, h, w, 3] if fits(*b, -1) && fits(*h, c) && fits(*w, c) => Layout::Nhwc,
        dims => {
            let hint = if dims.first().is_some_and(|b| *b != -1) { " (a batch dimension of -1 is needed)" } else { "" };
            return Err(format!("{sends}; the server's input \"{}\" is {}{hint}", input.name, shape(input)));
        }
    };
    let Some(output) = meta.outputs.first() else {
        return Err("labeld expects one output of logits; the server's model has none".into());
    };
    let expects = format!("labeld expects FP32 [-1, {classes}] logits ({classes} classes: the [model] labels list)");
    match output.shape.as_slice() {
        [b, k] if output.datatype == "FP32" && fits(*b, -1) && fits(*k, classes as i64) => {}
        _ => return Err(format!("{expects}; the server's output \"{}\" is {}", output.name, shape(output))),
    }
    Ok(Signature { input: input.name.clone(), output: output.name.clone(), layout })
}

/// `n` images of labeld's NHWC data as the raw little-endian bytes of the input tensor, and its shape.
pub fn encode(data: &[f32], n: usize, crop: u32, layout: Layout) -> (Vec<u8>, Vec<i64>) {
    let c = crop as usize;
    let mut bytes = Vec::with_capacity(data.len() * 4);
    match layout {
        Layout::Nhwc => data.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
        Layout::Nchw => {
            for image in data.chunks_exact(c * c * 3) {
                for channel in 0..3 {
                    image.iter().skip(channel).step_by(3).for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                }
            }
        }
    }
    let shape = match layout {
        Layout::Nchw => vec![n as i64, 3, crop.into(), crop.into()],
        Layout::Nhwc => vec![n as i64, crop.into(), crop.into(), 3],
    };
    (bytes, shape)
}

/// The `n × classes` logits in a response, from its raw contents (MLServer, Triton) or its typed
/// FP32 contents (Triton may answer either way).
pub fn decode(resp: &ModelInferResponse, output: &str, n: usize, classes: usize) -> Result<Vec<f32>, String> {
    let index = resp.outputs.iter().position(|o| o.name == output).unwrap_or(0);
    let Some(tensor) = resp.outputs.get(index) else {
        return Err("the server answered with no output tensor".into());
    };
    if tensor.datatype != "FP32" || tensor.shape != [n as i64, classes as i64] {
        return Err(format!("output {} {:?} for {n} images; expected FP32 [{n}, {classes}]", tensor.datatype, tensor.shape));
    }
    let logits: Vec<f32> = match resp.raw_output_contents.get(index) {
        Some(raw) => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        None => tensor.contents.as_ref().map(|c| c.fp32_contents.clone()).unwrap_or_default(),
    };
    if logits.len() != n * classes {
        return Err(format!("{} logits in the answer for {n} images of {classes} classes", logits.len()));
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::remote::proto::model_infer_response::InferOutputTensor;
    use crate::infer::remote::proto::InferTensorContents;

    fn meta(input: (&str, Vec<i64>), output: (&str, Vec<i64>)) -> ModelMetadataResponse {
        let t = |(datatype, shape): (&str, Vec<i64>), name: &str| TensorMetadata { name: name.into(), datatype: datatype.into(), shape };
        ModelMetadataResponse { name: "m".into(), inputs: vec![t(input, "input")], outputs: vec![t(output, "logits")], ..Default::default() }
    }

    #[test]
    fn the_servers_model_must_take_labelds_images_and_give_one_logit_per_label() {
        let ok = check(&meta(("FP32", vec![-1, 3, 224, 224]), ("FP32", vec![-1, 1000])), 224, 1000).unwrap();
        assert_eq!(ok, Signature { input: "input".into(), output: "logits".into(), layout: Layout::Nchw });
        let nhwc = check(&meta(("FP32", vec![-1, -1, -1, 3]), ("FP32", vec![-1, -1])), 224, 1000).unwrap();
        assert_eq!(nhwc.layout, Layout::Nhwc);
        let e = check(&meta(("FP32", vec![-1, 3, 256, 256]), ("FP32", vec![-1, 1000])), 224, 1000).unwrap_err();
        assert!(e.contains("labeld sends FP32 [-1, 3, 224, 224]") && e.contains("FP32 [-1, 3, 256, 256]"), "{e}");
        let e = check(&meta(("FP16", vec![-1, 3, 224, 224]), ("FP32", vec![-1, 1000])), 224, 1000).unwrap_err();
        assert!(e.contains("FP16"), "{e}");
        let e = check(&meta(("FP32", vec![1, 3, 224, 224]), ("FP32", vec![-1, 1000])), 224, 1000).unwrap_err();
        assert!(e.contains("batch dimension of -1"), "{e}");
        let e = check(&meta(("FP32", vec![-1, 3, 224, 224]), ("FP32", vec![-1, 10])), 224, 1000).unwrap_err();
        assert!(e.contains("labeld expects FP32 [-1, 1000]") && e.contains("\"logits\" is FP32 [-1, 10]"), "{e}");
    }

    #[test]
    fn nhwc_images_go_out_as_nchw_and_logits_come_back_raw_or_typed() {
        // Two 1×1 images: (r, g, b) = (1, 2, 3) and (4, 5, 6).
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (bytes, shape) = encode(&data, 2, 1, Layout::Nchw);
        assert_eq!(shape, [2, 3, 1, 1]);
        let back: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(back, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let planar: Vec<f32> = {
            let img = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]; // 2×2 NHWC
            let (b, _) = encode(&img, 1, 2, Layout::Nchw);
            b.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        assert_eq!(planar, [1.0, 4.0, 7.0, 10.0, 2.0, 5.0, 8.0, 11.0, 3.0, 6.0, 9.0, 12.0]);

        let tensor = InferOutputTensor { name: "logits".into(), datatype: "FP32".into(), shape: vec![1, 2], ..Default::default() };
        let raw = ModelInferResponse {
            outputs: vec![tensor.clone()],
            raw_output_contents: vec![[0.5f32.to_le_bytes(), (-1.0f32).to_le_bytes()].concat()],
            ..Default::default()
        };
        assert_eq!(decode(&raw, "logits", 1, 2).unwrap(), [0.5, -1.0]);
        let typed = InferOutputTensor { contents: Some(InferTensorContents { fp32_contents: vec![0.5, -1.0], ..Default::default() }), ..tensor };
        let typed = ModelInferResponse { outputs: vec![typed], ..Default::default() };
        assert_eq!(decode(&typed, "logits", 1, 2).unwrap(), [0.5, -1.0]);
        assert!(decode(&typed, "logits", 2, 2).unwrap_err().contains("expected FP32 [2, 2]"));
    }
}
