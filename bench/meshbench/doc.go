// Package meshbench measures the mesh's paths (issue 4) in a network
// namespace NAT lab (integration/netlab; root only). The benchmarks are Go
// tests that skip unless MESHBENCH=1 is set, so the normal suite does not
// run them; results are in docs/PERFORMANCE.md, "Mesh paths (issue 4)".
//
// TestMeshPaths: HTTP throughput and latency from a node behind one cone
// NAT to an app on a node behind another, reached directly (TCP through a
// port forward, the baseline), over a hole-punched QUIC path and over a
// TURN relay, in interleaved rounds, without and with a bandwidth limit on
// the app's home uplink; it prints the ratios to direct.
//
//	MESHBENCH=1 go test ./bench/meshbench -run TestMeshPaths -v -count=1
//
// Knobs (environment): MESHBENCH_ROUNDS (default 7), MESHBENCH_BIG (4 MiB
// GETs per configuration and round, default 6), MESHBENCH_SMALL (small
// GETs per configuration and round, default 200), MESHBENCH_UPLINK (tc
// rates of the limited scenarios, default "1gbit,100mbit", "off" for
// none), MESHBENCH_PROFILE=config:file (CPU profile of this process in
// that configuration's first throughput phase), MESHBENCH_RELAY_PROFILE
// (CPU profile of the relay process).
//
// TestMeshJoin: nodes under relay.Manager, one process per namespace; the
// time until a new node behind a cone NAT, and one behind a symmetric NAT,
// is reachable from every other node (and reaches them), median over
// runs, with the member list announced at once and with memberlist gossip.
//
//	MESHBENCH=1 go test ./bench/meshbench -run TestMeshJoin -v -count=1
//
// Knobs: MESHBENCH_JOIN_RUNS (default 5), MESHBENCH_JOIN_MODES (default
// "announced,gossip"), MESHBENCH_JOIN_LIMIT (seconds per run, default 60),
// MESHBENCH_LOGDIR (a debug log per node).
package meshbench
