// Package meshbench measures the mesh's paths (issue 4) in a network
// namespace NAT lab (integration/netlab; root only): HTTP throughput and
// latency from a node behind one cone NAT to an app on a node behind
// another, reached directly (TCP through a port forward, the baseline),
// over a hole-punched QUIC path and over a TURN relay, in interleaved
// rounds, and prints the ratios to direct. The benchmarks are Go tests that
// skip unless MESHBENCH=1 is set, so the normal suite does not run them:
//
//	MESHBENCH=1 go test ./bench/meshbench -run TestMeshPaths -v -count=1
//
// Knobs (environment): MESHBENCH_ROUNDS (default 7), MESHBENCH_BIG (4 MiB
// GETs per configuration and round, default 6), MESHBENCH_SMALL (small
// GETs per configuration and round, default 200). Results are in
// docs/PERFORMANCE.md, "Mesh paths (issue 4)".
package meshbench
