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
//     address (stun.go).
//   - Allocate: a TURN allocation with derived credentials, as a
//     net.PacketConn; pion refreshes it. Its doc lists the pion v2
//     pitfalls (client.go).
//   - Mesh: one socket (plain UDP, or a TURN relay conn with
//     MeshConfig.Via), mutually authenticated QUIC connections to peers
//     (certificates signed by a key derived from the secret, node name in
//     the certificate; certs.go), named service streams (Dial, Listen,
//     Handle), packets (SendPacket) and per-path status (Paths) (mesh.go).
//     The wire format is documented at the top of mesh.go.
//   - Transport: a memberlist.NodeAwareTransport over a Mesh that routes
//     by node name (transport.go); replicator.Config.Transport accepts it,
//     and the replicator's own streams ride along.
//
// # Not yet done (issue 4)
//
// TODO(issue 4): hole punching (pion/ice/v2 or reflexive addresses
// exchanged over gossip), PathPunched connections, and upgrading a
// relayed path to a punched one when it proves itself, falling back when
// it dies.
// TODO(issue 4): a Mesh on several sockets at once (the direct socket plus
// one relay conn per reachable node), choosing per peer; today a Mesh has
// one socket, so a node is either direct or relayed for all its peers.
// TODO(issue 4): re-allocate before credentials expire (DefaultCredentialTTL)
// and when an allocation fails; fail over to a second relay.
// TODO(issue 4): duplicate connections from simultaneous dials are both
// kept (the best one is used); close the extra one.
// TODO(issue 4): STUN on the mesh socket itself (quic.Transport's
// ReadNonQUICPacket/WriteTo) so the reflexive address of the QUIC socket is
// known while the mesh runs.
package relay
