//! Spill files: one file per spilled allocation generation in the spill directory.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub(crate) struct SpillDir {
    dir: PathBuf,
}

impl SpillDir {
    /// Opens (creating it if needed) and clears leftovers of an earlier run: their index is
    /// gone with that run.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "spill") {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, gen: u64) -> PathBuf {
        self.dir.join(format!("{gen}.spill"))
    }

    /// Writes the bytes of `gen` (copied out of the arena, or a sealed segment's mapping).
    pub(crate) fn write(&self, gen: u64, data: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{gen}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        drop(f);
        std::fs::rename(tmp, self.path(gen))
    }

    /// Reads the `len` bytes of `gen` back, handing them to `sink(offset, bytes)` in chunks.
    pub(crate) fn read(
        &self,
        gen: u64,
        len: u64,
        mut sink: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut f = std::fs::File::open(self.path(gen))?;
        if f.metadata()?.len() != len {
            return Err(std::io::Error::other("spill file has the wrong size"));
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = f.read(&mut buf[..(len - done).min(1 << 20) as usize])?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            sink(done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    pub(crate) fn remove(&self, gen: u64) {
        let _ = std::fs::remove_file(self.path(gen));
    }
}
