// Package relay gives every node of a circle a path to every other node
// across home NATs: STUN, TURN relays (pion/turn/v2) and one authenticated
// QUIC connection per peer path, with a memberlist transport on top. It
// imports no Caddy packages (deps_test.go at the repository root checks)
// and logs with log/slog.
//
// # Pieces
//
//   - Credentials: TURN long-term credentials derived from the circle
//     secret, REST-API style and time-limited (creds.go).
//   - Server: a TURN server (UDP relays) that also answers STUN Binding
//     requests, handed its socket. Only holders of the secret allocate;
//     allocations relay only to circle peers (ServerConfig.Peers), never
//     to loopback or the server's own addresses (server.go).
//   - Reflexive: a STUN client that finds a socket's server-reflexive
//     address; Mesh.Reflexive does it on a running mesh's socket (stun.go).
//   - Allocate: a TURN allocation with derived credentials, as a
//     net.PacketConn; pion refreshes it. Its doc lists the pion v2
//     pitfalls (client.go).
//   - Mesh: a primary socket (plain UDP, or a TURN relay conn with
//     MeshConfig.Via) plus any number of TURN relay conns (AddRelay),
//     mutually authenticated QUIC connections to peers (certificates signed
//     by a key derived from the secret, node name in the certificate;
//     certs.go): Connect (direct), ConnectVia (through a relay), Punch
//     (simultaneous dial to a reflexive address). Named service streams
//     (Dial, Listen, Handle), packets (SendPacket) and per-path status
//     (Paths). Traffic takes the best live path (direct, then punched,
//     then relayed), so a punched path takes over from a relay and the
//     relay, kept alive, takes over again when the punched path dies.
//     Duplicate connections are retired. The wire format is documented at
//     the top of mesh.go.
//   - Introductions: PunchVia asks a node both peers reach directly for
//     the other's public address (the source address it sees) and has it
//     tell the other to punch back at the same time (introduce.go).
//   - Transport: a memberlist.NodeAwareTransport over a Mesh that routes
//     by node name (transport.go); replicator.Config.Transport accepts it,
//     and the replicator's own streams ride along.
//
// # Not yet done (issue 4)
//
// TODO(issue 4): the policy that drives the mechanisms (in caddymodule or
// a small manager here): keep a direct path to every reachable node, a
// relay allocation where the NAT is symmetric, PunchVia a reachable node
// towards every other NATed member (retrying, falling back to ConnectVia),
// reconnect when the home router changes our public port. Today the
// Transport's automatic connections go over the primary socket to the
// memberlist address only. pion/ice/v2 was not used: QUIC's own
// retransmitted Initials do the simultaneous open.
// TODO(issue 4): re-allocate before credentials expire (DefaultCredentialTTL)
// and when an allocation fails; fail over to a second relay.
// TODO(issue 4): proxied HTTP to circle services (a mesh service per
// circle service, `reverse_proxy` transport in caddymodule).
package relay
