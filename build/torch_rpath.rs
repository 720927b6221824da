//! Shared build script: bakes torch's library directory into the run path of every
//! binary and test this package links, so nothing needs `LD_LIBRARY_PATH`, and names
//! it to the code as `SPUR_TORCH_LIB` (tests look there for torch's CUDA library).
//!
//! torch-sys declares `links = "tch"`, so cargo hands its `libtorch_lib` metadata to
//! the build scripts of packages that depend on it directly as `DEP_TCH_LIBTORCH_LIB`.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
            println!("cargo:rustc-env=SPUR_TORCH_LIB={dir}");
        }
        Err(_) => println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; binaries will need torch on the library path"),
    }
}
