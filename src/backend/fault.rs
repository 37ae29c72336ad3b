//! Test-only fault injection (cargo feature `fault-injection`, enabled for the test builds
//! only: release builds and the Docker image have none of it). When the file named by
//! `VISIONSERVE_FAULT_FILE` exists, the next batch of every model reads it: `panic` panics
//! inside the batch; `hang` blocks the batch for as long as the file exists (a wedged model
//! that comes back when the file is removed).

use std::time::Duration;

pub fn before_batch() {
    let Some(path) = std::env::var_os("VISIONSERVE_FAULT_FILE") else {
        return;
    };
    let Ok(fault) = std::fs::read_to_string(&path) else {
        return;
    };
    match fault.trim() {
        "panic" => panic!("injected fault: panic"),
        "hang" => {
            while std::path::Path::new(&path).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => {}
    }
}
