//! Linux guests (being written).
