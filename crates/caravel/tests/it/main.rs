//! End-to-end tests: real `caravel server` and `caravel agent` processes on loopback.

mod harness;

mod authz;
mod bad_input;
mod checkpoints;
mod edges;
mod failures;
mod gangs;
mod images;
mod isolation;
mod jobs;
mod logs;
mod postgres;
mod protocols;
mod services;
mod sim;
mod surface;
mod tls;
mod workdirs;
