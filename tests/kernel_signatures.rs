//! Every kernel the CUDA backend launches takes exactly the parameters its launcher passes. The
//! launchers fill the structs of src/backend/cuda/kernel_params.rs by field name, so what a
//! launch passes is the declaration; these tests hold each declaration against
//! - the kernels NVRTC compiles: kernels/*.cu compiled with `extern "C"` removed, so that each
//!   kernel's symbol is its C++ mangled name, which spells its parameter types
//!   (`demangled_params`), for sm_90 (the kinds do not depend on the architecture; that every
//!   file compiles for sm_80 too is tests/doctor.rs's);
//! - the parameter names in kernels/*.cu, read from the source (macro-made kernels by
//!   substituting each invocation's arguments into the name), so two parameters of one kind
//!   cannot be declared in swapped order.
//!
//! Needs NVRTC (tests/run.sh fetches the wheels and sets BERTFT_CUDA_WHEELS), not a GPU.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bertft_cuda::backend::cuda::cubin::kernel_names;
use bertft_cuda::backend::cuda::nvrtc::file_options;
use bertft_cuda::backend::cuda::{
    declared_kernels, demangled_params, kernel_files, kernel_headers, nvrtc, Arch, Nvrtc, ParamKind,
};

fn require_nvrtc() -> &'static Nvrtc {
    nvrtc().unwrap_or_else(|e| {
        panic!(
            "these tests need NVRTC 13: run tests/run.sh, which fetches the NVRTC wheels and sets \
             BERTFT_CUDA_WHEELS (or set CUDA_HOME to a CUDA 13 toolkit). {e:#}"
        )
    })
}

const C_LINKAGE: &str = "extern \"C\" __global__";

/// Kernel name → parameter kinds, as NVRTC compiles kernels/ for sm_90 with C++ linkage
/// (compiled once for all the tests of this file: it takes a while).
fn compiled_kinds() -> &'static BTreeMap<String, Vec<ParamKind>> {
    static COMPILED: OnceLock<BTreeMap<String, Vec<ParamKind>>> = OnceLock::new();
    COMPILED.get_or_init(|| compile_cxx(require_nvrtc(), "sm_90".parse().unwrap()))
}

fn compile_cxx(nvrtc: &Nvrtc, arch: Arch) -> BTreeMap<String, Vec<ParamKind>> {
    let headers = kernel_headers();
    let mut kinds = BTreeMap::new();
    for (file, source) in kernel_files() {
        let cxx = source.replace(C_LINKAGE, "__global__");
        let options = file_options(file, &cxx).unwrap();
        let cubin = nvrtc
            .compile_cubin(file, &cxx, &headers, arch, &options)
            .unwrap_or_else(|e| panic!("{e}"));
        let symbols = kernel_names(&cubin).unwrap();
        assert!(
            !symbols.is_empty(),
            "{file}: the C++ compile made no kernel"
        );
        for symbol in symbols {
            let (name, params) =
                demangled_params(&symbol).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            assert!(
                kinds.insert(name.clone(), params).is_none(),
                "{file}: two kernels named {name}"
            );
        }
    }
    kinds
}

/// Joins `\`-continued lines: each `#define` becomes one line.
fn logical_lines(source: &str) -> Vec<String> {
    source
        .replace("\\\r\n", " ")
        .replace("\\\n", " ")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The comma-separated items of `list`, at parenthesis depth 0, trimmed.
fn split_top_level(list: &str) -> Vec<String> {
    let (mut items, mut item, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in list.chars() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => {
                items.push(item.trim().to_string());
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    if !item.trim().is_empty() {
        items.push(item.trim().to_string());
    }
    items
}

/// The last identifier of a parameter declaration (`const T* __restrict__ x` → `x`).
fn param_name(decl: &str) -> String {
    decl.rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .find(|w| !w.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// A kernel declared in a source line: its name as written (`NAME`, `foo_##SUFFIX`) and its
/// parameter names.
fn kernels_declared_in(line: &str) -> Vec<SourceKernel> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find(C_LINKAGE) {
        let after = rest[at + C_LINKAGE.len()..].trim_start();
        let after = after
            .strip_prefix("void")
            .expect("a kernel returns void")
            .trim_start();
        // Skip `__launch_bounds__(…)`.
        let after = match after.strip_prefix("__launch_bounds__") {
            Some(a) => a[a.find(')').unwrap() + 1..].trim_start(),
            None => after,
        };
        let open = after.find('(').unwrap();
        let close = open + after[open..].find(')').unwrap();
        let name: String = after[..open].split_whitespace().collect();
        let params = split_top_level(&after[open + 1..close])
            .iter()
            .map(|p| param_name(p))
            .collect();
        found.push((name, params));
        rest = &after[close..];
    }
    found
}

/// A kernel as a source line declares it: its name as written, and its parameter names.
type SourceKernel = (String, Vec<String>);

/// Kernel name → parameter names, as kernels/*.cu declare them.
fn source_param_names() -> BTreeMap<String, Vec<String>> {
    let mut names = BTreeMap::new();
    for (file, source) in kernel_files() {
        let lines = logical_lines(source);
        // Macro name → (its parameters, the kernels its body declares).
        let mut macros: BTreeMap<String, (Vec<String>, Vec<SourceKernel>)> = BTreeMap::new();
        // Outside macros a declaration may span lines.
        let plain: Vec<&str> = lines
            .iter()
            .filter(|l| !l.trim_start().starts_with("#define"))
            .map(String::as_str)
            .collect();
        for (name, params) in kernels_declared_in(&plain.join("\n")) {
            names.insert(name, params);
        }
        for line in &lines {
            if let Some(define) = line.trim_start().strip_prefix("#define") {
                let kernels = kernels_declared_in(line);
                // A function-like macro: `#define NAME(PARAMS) body`, `(` right after NAME.
                let define = define.trim_start();
                let end = define
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(define.len());
                let (name, rest) = define.split_at(end);
                if let (Some(params), false) = (rest.strip_prefix('('), kernels.is_empty()) {
                    let params = split_top_level(&params[..params.find(')').unwrap()]);
                    macros.insert(name.to_string(), (params, kernels));
                }
            }
        }
        for line in &lines {
            let line = line.trim();
            let Some((mac, args)) = line.split_once('(') else {
                continue;
            };
            let Some((params, kernels)) = macros.get(mac.trim()) else {
                continue;
            };
            let args = split_top_level(args.trim_end().strip_suffix(')').unwrap());
            assert_eq!(args.len(), params.len(), "{file}: {line}");
            for (pattern, kernel_params) in kernels {
                let name: String = pattern
                    .split("##")
                    .map(|token| {
                        let token = token.trim();
                        match params.iter().position(|p| p == token) {
                            Some(i) => args[i].clone(),
                            None => token.to_string(),
                        }
                    })
                    .collect();
                names.insert(name, kernel_params.clone());
            }
        }
    }
    names
}

#[test]
fn every_declared_kernel_takes_the_declared_kinds() {
    let compiled = compiled_kinds();
    let mut checked = 0;
    for sig in declared_kernels() {
        let want: Vec<ParamKind> = sig.params.iter().map(|&(_, k)| k).collect();
        for kernel in sig.kernels {
            let got = compiled
                .get(*kernel)
                .unwrap_or_else(|| panic!("{kernel} is not among the compiled kernels"));
            assert_eq!(
                got, &want,
                "{kernel}: compiled parameters ≠ declared {:?}",
                sig.params
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} kernels checked");
}

#[test]
fn every_declared_kernel_has_the_declared_parameter_names() {
    let source = source_param_names();
    for sig in declared_kernels() {
        let want: Vec<&str> = sig.params.iter().map(|&(n, _)| n).collect();
        for kernel in sig.kernels {
            let got = source
                .get(*kernel)
                .unwrap_or_else(|| panic!("{kernel} is not declared in kernels/*.cu"));
            assert_eq!(
                got, &want,
                "{kernel}: parameter names in kernels/ ≠ declared"
            );
        }
    }
}

/// The source reading above finds exactly the kernels NVRTC compiles, so it is not missing a
/// declaration form (and the kind check covers what it names).
#[test]
fn the_source_reading_finds_every_compiled_kernel() {
    let compiled = compiled_kinds();
    let source = source_param_names();
    let compiled_names: Vec<&String> = compiled.keys().collect();
    let source_names: Vec<&String> = source.keys().collect();
    assert_eq!(source_names, compiled_names);
    for (name, kinds) in compiled {
        assert_eq!(source[name].len(), kinds.len(), "{name}: parameter count");
    }
}

/// Every compiled kernel is declared, so some launcher can launch it: a kernel no launcher
/// names would be code that no test and no run ever executes (16-bit instances of ops whose
/// tensors are fp32 under every precision, say).
#[test]
fn every_compiled_kernel_is_declared() {
    let declared: std::collections::BTreeSet<&str> = declared_kernels()
        .iter()
        .flat_map(|sig| sig.kernels.iter().copied())
        .collect();
    let undeclared: Vec<&String> = compiled_kinds()
        .keys()
        .filter(|name| !declared.contains(name.as_str()))
        .collect();
    assert!(
        undeclared.is_empty(),
        "compiled, never launched: {undeclared:?}"
    );
}
