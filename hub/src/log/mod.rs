//! The log itself: shard, producer, subscriber and owner ids, sequences and
//! epochs ([`ids`]), events and their hash chain ([`event`]), and the checks
//! every reader makes ([`verify`]).

pub mod event;
pub mod ids;
pub mod verify;
