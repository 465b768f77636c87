//! Free loopback ports.

use std::{collections::HashSet, net::TcpListener, sync::Mutex};

/// Ports this process has already handed out, so two helpers of one test binary never get
/// the same port even when the first has not bound it yet.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it), never the
/// same twice within one test process.
///
/// The caller binds it a moment later; another process could in theory take it in between,
/// which the OS makes unlikely by not reusing ephemeral ports quickly.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Redis Cluster's bus port is the client port + 10000.
const CLUSTER_BUS_OFFSET: u16 = 10000;

/// A free port for a Redis Cluster node: the port and its cluster bus port (the port +
/// 10000) are both free now, and neither is handed out again within this process.
pub(crate) fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else {
            continue;
        };
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let handed_out = handed_out.get_or_insert_with(HashSet::new);
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() && handed_out.insert(bus) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).expect("port a is free");
        TcpListener::bind(("127.0.0.1", b)).expect("port b is free");
    }

    #[test]
    fn cluster_ports_come_with_a_free_bus_port() {
        let port = free_cluster_port();
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        TcpListener::bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET)).expect("its bus port is free");
    }
}
