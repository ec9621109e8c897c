//! (to be written)
pub const PLACEHOLDER: () = ();
