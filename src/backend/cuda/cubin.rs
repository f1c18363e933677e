//! Reading a CUBIN (a 64-bit little-endian ELF file): the names of its kernels, and the
//! registers and stack frame ptxas gave each.
//!
//! A kernel (a `__global__` function, an entry point the driver can launch) is a FUNC symbol
//! whose `st_other` carries `STO_CUDA_ENTRY` (0x10); device functions that were not inlined are
//! FUNC symbols without it. Reading them from the CUBIN (not the source) counts exactly what the
//! compiler emitted, templates and macros included, and checks that a cached file is whole.
//! Per-function resources are attributes in the `SHT_CUDA_INFO` sections (`.nv.info*`): records
//! of a format byte, an attribute byte and a value (2 bytes, or for the sized format a 2-byte
//! length and that many bytes); `EIATTR_REGCOUNT` and `EIATTR_FRAME_SIZE` hold (symbol index,
//! value) pairs — what `cuobjdump -res-usage` prints as REG and STACK, read here without a GPU
//! or a CUDA toolkit.

use anyhow::{bail, ensure, Result};

const STO_CUDA_ENTRY: u8 = 0x10;
const STT_FUNC: u8 = 2;
const SHT_SYMTAB: u32 = 2;
const SHT_CUDA_INFO: u32 = 0x7000_0000;
const EIFMT_SVAL: u8 = 4;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_REGCOUNT: u8 = 0x2f;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// The kernel names of `cubin`, in symbol-table order.
pub fn kernel_names(cubin: &[u8]) -> Result<Vec<String>> {
    Ok(kernels(cubin)?.into_iter().map(|(_, name)| name).collect())
}

/// What ptxas gave one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of local-memory stack frame per thread: register spills and local arrays (0: the
    /// kernel lives in registers and shared memory).
    pub frame_bytes: u32,
}

/// The resources of every kernel of `cubin`, in symbol-table order.
pub fn kernel_resources(cubin: &[u8]) -> Result<Vec<KernelResources>> {
    let kernels = kernels(cubin)?;
    let Some(attrs) = read_attributes(cubin) else {
        bail!("truncated or malformed .nv.info section");
    };
    kernels
        .into_iter()
        .map(|(index, name)| {
            let value = |attr: u8| {
                attrs
                    .iter()
                    .find(|&&(a, sym, _)| a == attr && sym == index)
                    .map(|&(_, _, v)| v)
            };
            let Some(registers) = value(EIATTR_REGCOUNT) else {
                bail!("no register count for kernel {name}");
            };
            let frame_bytes = value(EIATTR_FRAME_SIZE).unwrap_or(0);
            Ok(KernelResources {
                name,
                registers,
                frame_bytes,
            })
        })
        .collect()
}

/// (symbol index, name) of every kernel.
fn kernels(cubin: &[u8]) -> Result<Vec<(u32, String)>> {
    ensure!(
        cubin.len() >= 64 && cubin.starts_with(b"\x7fELF") && cubin[4] == 2 && cubin[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    match read_entries(cubin) {
        Some(names) => Ok(names),
        None => bail!("truncated or malformed ELF file"),
    }
}

/// One section header: (sh_type, sh_offset, sh_size, sh_link, sh_entsize).
type Section = (u32, usize, usize, u32, usize);

fn sections(b: &[u8]) -> Option<Vec<Section>> {
    let shoff = u64_at(b, 0x28)?;
    let shentsize = u16_at(b, 0x3A)? as usize;
    let shnum = u16_at(b, 0x3C)? as usize;
    if shentsize < 64 {
        return None;
    }
    (0..shnum)
        .map(|i| {
            let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some((
                u32_at(b, h + 4)?,  // sh_type
                u64_at(b, h + 24)?, // sh_offset
                u64_at(b, h + 32)?, // sh_size
                u32_at(b, h + 40)?, // sh_link: the symbol table's string table
                u64_at(b, h + 56)?, // sh_entsize
            ))
        })
        .collect()
}

fn bytes_of(b: &[u8], (_, off, size, _, _): Section) -> Option<&[u8]> {
    b.get(off..off.checked_add(size)?)
}

fn read_entries(b: &[u8]) -> Option<Vec<(u32, String)>> {
    let sections = sections(b)?;
    let mut names = Vec::new();
    for &section in &sections {
        let (kind, _, _, link, entsize) = section;
        if kind != SHT_SYMTAB {
            continue;
        }
        let strtab = bytes_of(b, *sections.get(link as usize)?)?;
        let symtab = bytes_of(b, section)?;
        if entsize < 24 {
            return None;
        }
        for (index, sym) in symtab.chunks_exact(entsize).enumerate() {
            let (info, other) = (sym[4], sym[5]);
            if info & 0xf != STT_FUNC || other & STO_CUDA_ENTRY == 0 {
                continue;
            }
            let name_at = u32_at(sym, 0)? as usize;
            let name = strtab.get(name_at..)?;
            let end = name.iter().position(|&c| c == 0)?;
            let name = String::from_utf8_lossy(&name[..end]).into_owned();
            names.push((u32::try_from(index).ok()?, name));
        }
    }
    Some(names)
}

/// Every (attribute, symbol index, value) record of the `SHT_CUDA_INFO` sections whose value is
/// a (symbol index, u32) pair.
fn read_attributes(b: &[u8]) -> Option<Vec<(u8, u32, u32)>> {
    let mut attrs = Vec::new();
    for section in sections(b)? {
        if section.0 != SHT_CUDA_INFO {
            continue;
        }
        let data = bytes_of(b, section)?;
        let mut at = 0;
        while at + 4 <= data.len() {
            let (format, attr) = (data[at], data[at + 1]);
            let len = match format {
                EIFMT_SVAL => u16_at(data, at + 2)? as usize,
                _ => 0, // the 2-byte value is in the record's header
            };
            let value = data.get(at + 4..at + 4 + len)?;
            if format == EIFMT_SVAL && len == 8 {
                attrs.push((attr, u32_at(value, 0)?, u32_at(value, 4)?));
            }
            at += 4 + len;
        }
    }
    Some(attrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_an_elf_file() {
        assert!(kernel_names(b"").is_err());
        assert!(kernel_names(&[0u8; 100]).is_err());
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // Section headers said to lie past the end of the file.
        header[0x28] = 0xff;
        header[0x3A] = 64;
        header[0x3C] = 3;
        let e = kernel_names(&header).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
    }
}
