//! `tenso dns`: the records each local domain needs, and whether they are published.
