//! The hub's configuration: command-line flags and `OMNIRELAY_HUB_*`
//! environment variables, one vocabulary, validated into a [`Config`].
//!
//! Every flag has exactly one environment variable, declared next to it, named
//! `OMNIRELAY_HUB_` plus the flag in upper snake case (`--database-url` is
//! `OMNIRELAY_HUB_DATABASE_URL`). A flag given on the command line wins over
//! its variable. Parsing ([`Cli`], clap) checks each value on its own;
//! [`ServeArgs::validate`] checks how values combine and returns a
//! [`ConfigError`] that names the flags involved.
//!
//! Secrets never reach logs: [`DatabaseUrl`] prints with its password
//! replaced by `***`, and clap is told not to show the variable's value in
//! `--help`.

mod flags;

pub use self::flags::*;
