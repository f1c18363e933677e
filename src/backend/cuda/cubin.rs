//! Reading a CUBIN (a 64-bit little-endian ELF file): the names of its kernels.
//!
//! A kernel (a `__global__` function, an entry point the driver can launch) is a FUNC symbol
//! whose `st_other` carries `STO_CUDA_ENTRY` (0x10); device functions that were not inlined are
//! FUNC symbols without it. Reading them from the CUBIN (not the source) counts exactly what the
//! compiler emitted, templates and macros included, and checks that a cached file is whole.

use anyhow::{bail, ensure, Result};

const STO_CUDA_ENTRY: u8 = 0x10;
const STT_FUNC: u8 = 2;
const SHT_SYMTAB: u32 = 2;

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
    ensure!(
        cubin.len() >= 64 && cubin.starts_with(b"\x7fELF") && cubin[4] == 2 && cubin[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    match read_entries(cubin) {
        Some(names) => Ok(names),
        None => bail!("truncated or malformed ELF file"),
    }
}

fn read_entries(b: &[u8]) -> Option<Vec<String>> {
    let shoff = u64_at(b, 0x28)?;
    let shentsize = u16_at(b, 0x3A)? as usize;
    let shnum = u16_at(b, 0x3C)? as usize;
    if shentsize < 64 {
        return None;
    }
    let section = |i: usize| -> Option<(u32, usize, usize, u32, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(b, h + 4)?,  // sh_type
            u64_at(b, h + 24)?, // sh_offset
            u64_at(b, h + 32)?, // sh_size
            u32_at(b, h + 40)?, // sh_link: the symbol table's string table
            u64_at(b, h + 56)?, // sh_entsize
        ))
    };
    let mut names = Vec::new();
    for i in 0..shnum {
        let (kind, off, size, link, entsize) = section(i)?;
        if kind != SHT_SYMTAB {
            continue;
        }
        let (_, str_off, str_size, _, _) = section(link as usize)?;
        let strtab = b.get(str_off..str_off.checked_add(str_size)?)?;
        let symtab = b.get(off..off.checked_add(size)?)?;
        if entsize < 24 {
            return None;
        }
        for sym in symtab.chunks_exact(entsize) {
            let (info, other) = (sym[4], sym[5]);
            if info & 0xf != STT_FUNC || other & STO_CUDA_ENTRY == 0 {
                continue;
            }
            let name_at = u32_at(sym, 0)? as usize;
            let name = strtab.get(name_at..)?;
            let end = name.iter().position(|&c| c == 0)?;
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        }
    }
    Some(names)
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
