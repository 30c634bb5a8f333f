//! SCAFFOLD (issue 23): filled by its helper.
