//! Placeholder until the peer code lands.
use crate::cli::{DownloadArgs, SeedArgs};
use crate::error::Error;

pub fn download(_a: &DownloadArgs) -> Result<(), Error> {
    Err(Error::Usage("download is not built yet".into()))
}
pub fn seed(_a: &SeedArgs) -> Result<(), Error> {
    Err(Error::Usage("seed is not built yet".into()))
}
