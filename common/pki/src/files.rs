//! Reading the PEM files of a PKI directory. Files an operator names ([`read_bytes`]) are read
//! as named; the development CA's own files ([`read_private_pem`]) only from a private
//! directory, without following a symlink (see the `private` module).
use crate::private::{read_private_file, Secrecy};
use crate::PkiError;
use std::fs;
use std::path::Path;

/// Largest PEM file read (a certificate chain or a key is a few KiB).
pub(crate) const MAX_PEM: u64 = 1 << 20;

pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A PEM file of a private directory, as text.
pub(crate) fn read_private_pem(path: &Path, secrecy: Secrecy) -> Result<String, PkiError> {
    let bytes = read_private_file(path, MAX_PEM, secrecy)?;
    String::from_utf8(bytes).map_err(|_| PkiError::Parse {
        path: path.to_owned(),
        reason: "not UTF-8 text".into(),
    })
}
