//! Self-contained HTML reports for `bench` and `tune`: charts drawn as inline SVG.

pub mod charts;
