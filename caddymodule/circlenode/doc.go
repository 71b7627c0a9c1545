// Package circlenode assembles one node of a circle: the mesh on the
// listen socket (and the TURN server of a relay), the path manager, the
// replicator over the mesh, the identity service on the replicated store
// and the circle services a node offers. It imports no Caddy, certmagic or
// zap (deps_test.go enforces it): caddymodule keeps the node in a
// caddy.UsagePool and translates the Caddyfile into a Config, and the
// fault-injection suite and the benchmarks run the same assembly without
// Caddy.
package circlenode
