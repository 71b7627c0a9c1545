// Package identity is the circle's identity provider, shared by every node
// through a replicated key/value Store. It imports no Caddy, certmagic, zap,
// memberlist, pion or replicator code; caddymodule adapts the replicated
// store to the Store interface.
//
// It provides:
//
//   - Store, the small bucket/key/value interface it works on, and
//     MemStore, a thread-safe in-memory Store with working Watch for tests
//     and single-process use.
//   - Service (New, Start, Close) configured by Config (DefaultConfig).
//   - Accounts: CreateAccount, Account, AccountByUsername, Accounts,
//     UpdateProfile, ChangePassword, SetPassword, SetGroups, SetDisabled,
//     Rename. Usernames are normalised (lowercase [a-z0-9._-], 2-32
//     characters, starting with a letter or digit) and indexed in a
//     first-writer-wins bucket; after a partition, the account that lost its
//     name is renamed "<name>-<6 hex of its id>" with MustRename set.
//   - Passwords: argon2id (default m=19456 KiB, t=2, p=1) as PHC strings,
//     with a bound on hashes in flight; Login costs one hash for unknown
//     users too (no timing oracle) and throttles failures per IP and per
//     username (ThrottledError).
//   - Invites: CreateInvite, CheckInvite, Register (single use, groups from
//     the invite, only the token's SHA-256 stored).
//   - Sessions: IssueSession returns a compact JWS (EdDSA/Ed25519, go-jose)
//     with iss, sub, sid, iat, exp, username, name, email, groups, gen (the
//     account's session generation) and a kid header; Verify checks it
//     locally (never a network hop) with a bounded cache purged on
//     revocation, and refuses while the Service is not running (its
//     revocation view could be stale); RevokeSession, RevokeAll ("log out
//     everywhere": increments the generation and revokes the listed
//     sessions; no wall clocks compared), Sessions, Session.
//   - Signing keys: rotated every KeyRotation by the maintenance loop (or
//     RotateKey), private halves sealed with AES-GCM under a key derived
//     from the circle secret; old public keys verify until their tokens have
//     expired; JWKS publishes them.
//   - Policy, the allow rule of the circle_auth gate.
//   - FirstWriterWinsBuckets and MergeFuncs, for configuring the replicated
//     store: account and invite records several nodes edit are joined per
//     field (merge.go), so no acknowledged edit is lost and a disable or a
//     used invite is never undone by a concurrent edit.
//   - Sentinel errors in errors.go.
//
// Buckets and record formats (all values JSON with a "v" format version
// where they are records of this package): accounts, usernames, sessions,
// revocations, keys, invites, throttle; see the record types in each file
// and docs/INTERNALS.md.
package identity
