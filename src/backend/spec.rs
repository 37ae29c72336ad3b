//! A model version as its copies load it: the files, the preprocessing the model expects, and
//! where and how it runs.

use crate::config::Backend;
use crate::images::preprocess::PreprocessConfig;
use crate::repository::ModelFiles;
use tch::{Device, Kind};

/// A model version as its copies load it.
pub struct WorkerSpec {
    pub name: String,
    pub files: ModelFiles,
    pub preprocess: PreprocessConfig,
    pub num_classes: usize,
    pub device: Device,
    /// The precision: libtorch's element type, or OpenVINO's inference precision.
    pub kind: Kind,
    pub max_batch_size: usize,
    /// Which backend runs it (`--backend`, or the model's `backend` option).
    pub backend: Backend,
}
