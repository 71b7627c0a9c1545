// Package faults is the circle's fault-injection suite (issue 8, part 1):
// real node processes (faultnode) in network namespaces (integration/netlab),
// workloads recorded as a history of operations, nemeses (kills, partitions,
// loss, delay, clock offsets, address changes, wiped data) and checkers over
// the history and the nodes' final state. See docs/RELIABILITY.md.
//
// The package has only tests; `go test ./integration/faults/` runs the CI
// set, CIRCLE_SOAK=1 adds the long soak.
package faults
