package identity

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
	"unsafe"

	jose "github.com/go-jose/go-jose/v4"
)

// Claims are the verified contents of a session token.
//
// Verify reports the account's current Username, Name, Email and Groups
// when this node knows the account (so a group change takes effect at once,
// on every node), else the values signed into the token.
type Claims struct {
	Issuer    string    // "https://" + domain
	Subject   string    // account id
	SessionID string    // session id
	IssuedAt  time.Time // whole seconds
	Expiry    time.Time // whole seconds
	Username  string
	Name      string
	Email     string
	// Groups is shared with Verify's cache: treat it as read-only.
	Groups []string
}

// Session is a login session; its token carries the ID as "sid".
type Session struct {
	ID        string
	AccountID string
	UserAgent string
	IP        string
	Created   time.Time
	Expires   time.Time
}

// Token limits.
const (
	// maxTokenBytes: longer tokens are rejected before parsing.
	maxTokenBytes = 4096
	// maxClockSkew tolerates iat slightly in the future (other nodes' clocks).
	maxClockSkew = time.Minute
	maxUserAgent = 256
	maxIP        = 64
)

// tokenPayload is the JWT claims set of a session token.
type tokenPayload struct {
	Iss      string   `json:"iss"`
	Sub      string   `json:"sub"`
	Sid      string   `json:"sid"`
	Iat      int64    `json:"iat"`
	Exp      int64    `json:"exp"`
	Username string   `json:"username,omitempty"`
	Name     string   `json:"name,omitempty"`
	Email    string   `json:"email,omitempty"`
	Groups   []string `json:"groups,omitempty"`
	Gen      uint64   `json:"gen,omitempty"` // the account's session generation at issue
}

// sessionRecordVersion is the format version of sessions bucket values.
const sessionRecordVersion = 1

// sessionRecord is the value stored under sessions/<sid>, as JSON.
type sessionRecord struct {
	V         int       `json:"v"`
	ID        string    `json:"id"`
	AccountID string    `json:"account_id"`
	UserAgent string    `json:"user_agent,omitempty"`
	IP        string    `json:"ip,omitempty"`
	Created   time.Time `json:"created"`
	Expires   time.Time `json:"expires"`
	IssuedAt  int64     `json:"iat"`           // the token's iat, for the legacy "revoked before" rule
	Gen       uint64    `json:"gen,omitempty"` // the account's session generation at issue
}

// revocationRecord is the value of revocations/sid:<sid> ({"v":1,"exp"}:
// when the revoked token would have expired anyway, after which the record
// can go) and revocations/acct:<id> ({"v":1,"before"}: tokens of the
// account issued at or before this second are revoked), as JSON.
//
// acct: records are legacy: older builds wrote them for RevokeAll, which
// compared the revoking node's wall clock with the issuing node's. They are
// still honoured (tokens they revoked stay revoked) but no longer written;
// RevokeAll now increments the account's SessionGen and revokes the
// sessions it lists by id.
type revocationRecord struct {
	V      int       `json:"v"` // format version, 1
	Exp    time.Time `json:"exp,omitzero"`
	Before time.Time `json:"before,omitzero"`
}

// IssueSession creates a session for account a (re-read from the store:
// ErrNotFound, ErrDisabled), stores it (acknowledged) and returns its signed
// token, valid for SessionTTL.
func (s *Service) IssueSession(ctx context.Context, a Account, userAgent, ip string) (token string, sess Session, err error) {
	rec, err := s.loadAccount(a.ID)
	if err != nil {
		return "", Session{}, err
	}
	if rec.Disabled {
		return "", Session{}, fmt.Errorf("identity: issuing session for %s: %w", a.ID, ErrDisabled)
	}
	key, err := s.signingKey()
	if err != nil {
		return "", Session{}, fmt.Errorf("identity: issuing session: %w", err)
	}
	now := s.cfg.Now()
	iat := now.Truncate(time.Second)
	// A token issued in the same second as a "log out everywhere" would be
	// revoked by it (the check is per second); move it to the next second.
	s.stateMu.RLock()
	before, ok := s.revokedBefore[rec.ID]
	s.stateMu.RUnlock()
	if ok && iat.Unix() <= before.Unix() {
		iat = time.Unix(before.Unix()+1, 0)
	}
	gen := rec.SessionGen
	s.stateMu.RLock()
	if v, ok := s.accounts[rec.ID]; ok {
		gen = max(gen, v.sessionGen)
	}
	s.stateMu.RUnlock()
	exp := now.Add(s.cfg.SessionTTL).Truncate(time.Second)
	if exp.After(key.notAfter) { // never outlive the key (only if rotation lagged)
		exp = key.notAfter.Truncate(time.Second)
	}
	sess = Session{
		ID:        base64.RawURLEncoding.EncodeToString(randomBytes(16)),
		AccountID: rec.ID,
		UserAgent: truncateUTF8(userAgent, maxUserAgent),
		IP:        truncateUTF8(ip, maxIP),
		Created:   now.UTC(),
		Expires:   exp.UTC(),
	}
	b, err := json.Marshal(sessionRecord{
		V: sessionRecordVersion, ID: sess.ID, AccountID: sess.AccountID, UserAgent: sess.UserAgent,
		IP: sess.IP, Created: sess.Created, Expires: sess.Expires, IssuedAt: iat.Unix(), Gen: gen,
	})
	if err != nil {
		return "", Session{}, fmt.Errorf("identity: encoding session: %w", err)
	}
	if err := s.store.Put(ctx, bucketSessions, sess.ID, b); err != nil {
		return "", Session{}, fmt.Errorf("identity: storing session: %w", err)
	}
	payload, err := json.Marshal(tokenPayload{
		Iss: s.issuer, Sub: rec.ID, Sid: sess.ID, Iat: iat.Unix(), Exp: exp.Unix(),
		Username: rec.Username, Name: rec.Name, Email: rec.Email, Groups: rec.Groups, Gen: gen,
	})
	if err != nil {
		return "", Session{}, fmt.Errorf("identity: encoding token: %w", err)
	}
	jws, err := key.signer.Sign(payload)
	if err != nil {
		return "", Session{}, fmt.Errorf("identity: signing token: %w", err)
	}
	token, err = jws.CompactSerialize()
	if err != nil {
		return "", Session{}, fmt.Errorf("identity: serialising token: %w", err)
	}
	return token, sess, nil
}

// Verify checks a session token locally (no network): its size, that it is
// a compact JWS signed with EdDSA by a key of the circle's key set (looked
// up by the header kid only; jku, x5u and embedded jwk are ignored), its
// issuer and expiry, and that neither the session nor the account's tokens
// were revoked and the account is not disabled. It returns ErrInvalidToken,
// ErrExpired or ErrRevoked (possibly wrapped).
//
// Successful results are cached (bounded, keyed by the SHA-256 of the
// token) until the token expires; revocations and account changes, local
// or arriving from other nodes, purge the affected entries.
func (s *Service) Verify(token string) (Claims, error) {
	if len(token) == 0 || len(token) > maxTokenBytes {
		return Claims{}, ErrInvalidToken
	}
	if !s.running.Load() {
		// Without the watches, revocations may be stale: refuse.
		return Claims{}, errNotRunning
	}
	key := sha256.Sum256(unsafe.Slice(unsafe.StringData(token), len(token)))
	now := s.cfg.Now()
	if c, ok := s.cache.get(&key); ok {
		if !now.Before(c.Expiry) {
			s.cache.remove(&key)
			return Claims{}, ErrExpired
		}
		return c, nil
	}
	gen := s.cache.generation()
	c, err := s.verifyUncached(token, now)
	if err != nil {
		return Claims{}, err
	}
	s.cache.put(&key, c, gen)
	return c, nil
}

// errNotRunning is what Verify returns outside Start..Close.
var errNotRunning = fmt.Errorf("%w: %w", ErrInvalidToken, ErrNotStarted)

var edDSAOnly = []jose.SignatureAlgorithm{jose.EdDSA}

func (s *Service) verifyUncached(token string, now time.Time) (Claims, error) {
	// Compact serialization only (the JSON serializations, which ParseSigned
	// would also accept, have no business in a cookie).
	jws, err := jose.ParseSignedCompact(token, edDSAOnly)
	if err != nil || len(jws.Signatures) != 1 {
		return Claims{}, ErrInvalidToken
	}
	h := jws.Signatures[0].Protected
	if h.Algorithm != string(jose.EdDSA) || h.KeyID == "" || len(h.KeyID) > 64 {
		return Claims{}, ErrInvalidToken
	}
	pub, ok := s.verifyKey(h.KeyID, now)
	if !ok {
		return Claims{}, fmt.Errorf("unknown or retired key %q: %w", h.KeyID, ErrInvalidToken)
	}
	payload, err := jws.Verify(pub)
	if err != nil {
		return Claims{}, ErrInvalidToken
	}
	var p tokenPayload
	if err := json.Unmarshal(payload, &p); err != nil {
		return Claims{}, ErrInvalidToken
	}
	if p.Iss != s.issuer || !validAccountID(p.Sub) || p.Sid == "" || p.Iat <= 0 || p.Exp <= 0 {
		return Claims{}, ErrInvalidToken
	}
	iat, exp := time.Unix(p.Iat, 0), time.Unix(p.Exp, 0)
	if iat.After(now.Add(maxClockSkew)) {
		return Claims{}, ErrInvalidToken
	}
	if !now.Before(exp) {
		return Claims{}, ErrExpired
	}
	c := Claims{
		Issuer: p.Iss, Subject: p.Sub, SessionID: p.Sid, IssuedAt: iat, Expiry: exp,
		Username: p.Username, Name: p.Name, Email: p.Email, Groups: slices.Clip(p.Groups),
	}
	s.stateMu.RLock()
	defer s.stateMu.RUnlock()
	if _, ok := s.revokedSIDs[p.Sid]; ok {
		return Claims{}, ErrRevoked
	}
	if before, ok := s.revokedBefore[p.Sub]; ok && p.Iat <= before.Unix() {
		return Claims{}, ErrRevoked
	}
	if v, ok := s.accounts[p.Sub]; ok {
		if v.disabled || p.Gen < v.sessionGen {
			return Claims{}, ErrRevoked
		}
		c.Username, c.Name, c.Email, c.Groups = v.username, v.name, v.email, v.groups
	}
	return c, nil
}

// RevokeSession revokes session sid everywhere (acknowledged write of
// revocations/sid:<sid>) and deletes its record. Revoking an unknown
// session is not an error: the revocation is stored anyway.
func (s *Service) RevokeSession(ctx context.Context, sid string) error {
	if sid == "" || len(sid) > 128 || strings.ContainsAny(sid, "/\x00") {
		return fmt.Errorf("identity: session id %q: %w", sid, ErrInvalidInput)
	}
	exp := s.cfg.Now().Add(s.cfg.SessionTTL)
	if sess, err := s.Session(sid); err == nil {
		exp = sess.Expires
	}
	return s.revokeSession(ctx, sid, exp)
}

// revokeSession stores the revocation of session sid, whose token expires
// at exp, and deletes its record.
func (s *Service) revokeSession(ctx context.Context, sid string, exp time.Time) error {
	b, _ := json.Marshal(revocationRecord{V: 1, Exp: exp.UTC()})
	s.applyRevocation("sid:"+sid, revocationRecord{Exp: exp})
	if err := s.store.Put(ctx, bucketRevocations, "sid:"+sid, b); err != nil {
		return fmt.Errorf("identity: storing revocation: %w", err)
	}
	if err := s.store.Delete(ctx, bucketSessions, sid); err != nil {
		return fmt.Errorf("identity: deleting session: %w", err)
	}
	return nil
}

// RevokeAll logs account accountID out everywhere. No wall clock decides
// it (the revoking node's and the issuing node's may disagree):
//   - the account's SessionGen is incremented (acknowledged write of the
//     account record): every token and session issued before, on any node,
//     carries a lower generation and is refused wherever the new generation
//     has arrived;
//   - every session of the account this node knows of is revoked by id
//     (revocations/sid:<sid>, as RevokeSession), which also covers nodes
//     that have not seen the new generation yet.
//
// Sessions issued afterwards carry the new generation and stay valid.
func (s *Service) RevokeAll(ctx context.Context, accountID string) error {
	if !validAccountID(accountID) {
		return fmt.Errorf("identity: account %q: %w", accountID, ErrNotFound)
	}
	var errs []error
	if _, err := s.updateAccount(ctx, accountID, func(r *accountRecord, _ stamp) error {
		s.stateMu.RLock()
		if v, ok := s.accounts[accountID]; ok && v.sessionGen > r.SessionGen {
			r.SessionGen = v.sessionGen
		}
		s.stateMu.RUnlock()
		r.SessionGen++
		return nil
	}); err != nil {
		if errors.Is(err, ErrNotFound) {
			return err
		}
		errs = append(errs, err) // still revoke the sessions by id
	}
	sessions, err := s.listSessions(accountID)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, sess := range sessions {
		if err := s.revokeSession(ctx, sess.ID, sess.Expires); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("identity: revoking all sessions of %s: %w", accountID, err)
	}
	return nil
}

// applyRevocation records a revocation in memory and purges the cache.
func (s *Service) applyRevocation(key string, rec revocationRecord) {
	switch {
	case strings.HasPrefix(key, "sid:"):
		sid := key[len("sid:"):]
		s.stateMu.Lock()
		s.revokedSIDs[sid] = rec.Exp
		s.stateMu.Unlock()
		s.cache.purge(func(c *Claims) bool { return c.SessionID == sid })
	case strings.HasPrefix(key, "acct:"):
		id := key[len("acct:"):]
		s.stateMu.Lock()
		if old, ok := s.revokedBefore[id]; !ok || rec.Before.After(old) {
			s.revokedBefore[id] = rec.Before
		}
		s.stateMu.Unlock()
		s.cache.purge(func(c *Claims) bool { return c.Subject == id })
	}
}

// onRevocationEvent is the revocations bucket watch callback.
func (s *Service) onRevocationEvent(key string, value []byte, deleted bool) {
	if deleted {
		// Only pruned once the revoked tokens expired; forgetting is safe.
		s.stateMu.Lock()
		delete(s.revokedSIDs, strings.TrimPrefix(key, "sid:"))
		s.stateMu.Unlock()
		return
	}
	var rec revocationRecord
	if err := decodeJSON("revocation "+key, value, &rec); err != nil {
		s.log.Warn("ignoring bad revocation record", "key", key, "error", err)
		return
	}
	s.applyRevocation(key, rec)
}

// loadRevocations reads the revocations bucket into memory.
func (s *Service) loadRevocations() error {
	entries, err := s.store.List(bucketRevocations, "")
	if err != nil {
		return fmt.Errorf("listing revocations: %w", err)
	}
	for _, e := range entries {
		s.onRevocationEvent(e.Key, e.Value, false)
	}
	return nil
}

// pruneRevocations forgets session revocations whose tokens have expired
// and account revocations older than any live token.
func (s *Service) pruneRevocations(ctx context.Context, now time.Time) {
	var keys []string
	s.stateMu.Lock()
	for sid, exp := range s.revokedSIDs {
		if len(keys) < maxPrunePerRun && now.After(exp.Add(maxClockSkew)) {
			delete(s.revokedSIDs, sid)
			keys = append(keys, "sid:"+sid)
		}
	}
	s.stateMu.Unlock()
	// Account revocations are kept in memory (one per account); their
	// records are small and stay.
	for _, k := range keys {
		if err := s.store.Delete(ctx, bucketRevocations, k); err != nil {
			s.log.Warn("pruning revocation", "key", k, "error", err)
		}
	}
}

// Session returns session sid (expired or revoked sessions may still be
// returned until pruned; use Sessions for the live ones), or ErrNotFound.
func (s *Service) Session(sid string) (Session, error) {
	b, err := s.store.Get(bucketSessions, sid)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return Session{}, fmt.Errorf("identity: session %s: %w", sid, ErrNotFound)
		}
		return Session{}, fmt.Errorf("identity: reading session: %w", err)
	}
	var rec sessionRecord
	if err := decodeJSON("session "+sid, b, &rec); err != nil {
		return Session{}, err
	}
	return rec.session(), nil
}

func (r sessionRecord) session() Session {
	return Session{ID: r.ID, AccountID: r.AccountID, UserAgent: r.UserAgent, IP: r.IP, Created: r.Created, Expires: r.Expires}
}

// listSessions returns every stored session of the account.
func (s *Service) listSessions(accountID string) ([]sessionRecord, error) {
	entries, err := s.store.List(bucketSessions, "")
	if err != nil {
		return nil, fmt.Errorf("identity: listing sessions: %w", err)
	}
	var out []sessionRecord
	for _, e := range entries {
		var rec sessionRecord
		if err := json.Unmarshal(e.Value, &rec); err != nil || rec.ID != e.Key {
			continue
		}
		if rec.AccountID == accountID {
			out = append(out, rec)
		}
	}
	return out, nil
}

// Sessions returns the account's live sessions (not expired, not revoked),
// oldest first.
func (s *Service) Sessions(accountID string) ([]Session, error) {
	all, err := s.listSessions(accountID)
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	var out []Session
	s.stateMu.RLock()
	before, hasBefore := s.revokedBefore[accountID]
	gen := s.accounts[accountID].sessionGen
	for _, rec := range all {
		if !now.Before(rec.Expires) {
			continue
		}
		if _, revoked := s.revokedSIDs[rec.ID]; revoked {
			continue
		}
		if rec.Gen < gen || hasBefore && rec.IssuedAt <= before.Unix() { // the rules Verify applies
			continue
		}
		out = append(out, rec.session())
	}
	s.stateMu.RUnlock()
	slices.SortFunc(out, func(a, b Session) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// pruneSessions deletes session records past their expiry.
func (s *Service) pruneSessions(ctx context.Context, now time.Time) {
	entries, err := s.store.List(bucketSessions, "")
	if err != nil {
		return
	}
	n := 0
	for _, e := range entries {
		var rec sessionRecord
		if err := json.Unmarshal(e.Value, &rec); err != nil {
			continue
		}
		if now.After(rec.Expires.Add(maxClockSkew)) {
			if n++; n > maxPrunePerRun || ctx.Err() != nil {
				return
			}
			if err := s.store.Delete(ctx, bucketSessions, e.Key); err != nil {
				s.log.Warn("pruning session", "session", e.Key, "error", err)
			}
		}
	}
}

// truncateUTF8 cuts s to at most n bytes without splitting a character.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// tokenCache caches verified tokens by the SHA-256 of the token.
type tokenCache struct {
	mu   sync.RWMutex // guards the following
	m    map[[32]byte]Claims
	gen  uint64 // incremented by every purge; a put from before a purge is dropped
	size int
}

func newTokenCache(size int) *tokenCache {
	return &tokenCache{m: make(map[[32]byte]Claims), size: size}
}

func (c *tokenCache) get(k *[32]byte) (Claims, bool) {
	c.mu.RLock()
	v, ok := c.m[*k]
	c.mu.RUnlock()
	return v, ok
}

func (c *tokenCache) generation() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

// put caches v unless a purge happened since gen was read (the result may
// predate a revocation).
func (c *tokenCache) put(k *[32]byte, v Claims, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen || c.size <= 0 {
		return
	}
	if _, ok := c.m[*k]; !ok && len(c.m) >= c.size {
		for old := range c.m { // evict an arbitrary entry
			delete(c.m, old)
			break
		}
	}
	c.m[*k] = v
}

func (c *tokenCache) remove(k *[32]byte) {
	c.mu.Lock()
	delete(c.m, *k)
	c.mu.Unlock()
}

// purge drops the entries for which match returns true.
func (c *tokenCache) purge(match func(*Claims) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for k, v := range c.m {
		if match(&v) {
			delete(c.m, k)
		}
	}
}

func (c *tokenCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.m)
}
