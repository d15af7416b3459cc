//! Multipath IP (MPIP) termination. Not implemented yet: see issue 6 and `ARCHITECTURE.md`.
