// Bake libtorch's lib dir into the binary's rpath so it runs without LD_LIBRARY_PATH and never picks
// up a different libtorch installed elsewhere on the machine.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=LABELD_LIBTORCH_LIB={lib}");
    }
}
