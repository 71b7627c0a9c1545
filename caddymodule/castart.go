package caddymodule

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// First start: the internal CA is created once.
//
// Caddy's pki app creates a CA's files in the configured storage while it
// is provisioned, without a lock (caddypki ca.go): loadOrGenRoot loads
// root.crt and, if it is missing, generates a root and stores root.crt and
// root.key; loadOrGenIntermediate does the same with intermediate.crt and
// intermediate.key. On shared storage, nodes starting together each create
// their own root (the node keeps what it generated in memory, so they serve
// different roots, and the records' merge can pair one node's certificate
// with another's key), or a node finds a root whose key has not reached it
// yet and exits.
//
// So the storage serialises the creation itself:
//   - A Load of a missing CA certificate (root.crt or intermediate.crt)
//     takes the circle lock "pki_create_<ca id>" (Storage.Lock) and looks
//     again. If the certificate arrived meanwhile, it unlocks and returns
//     it. Otherwise it returns "not exist" and keeps the lock: Caddy now
//     generates and stores the files, and the lock is released after
//     intermediate.key is stored, or caCreateIdle after the last CA file was
//     stored (a CA whose intermediate comes from the config), or on Cleanup.
//   - CA files are stored with all-alive acknowledgement, so every alive
//     node holds them before the creator releases the lock.
//   - A Load of a CA key (root.key, intermediate.key) whose certificate is
//     stored waits, at most caPairWait, until the key is there and matches
//     the certificate: the window in which a node found a root (or an
//     intermediate) but its key had not reached it yet.

const (
	// caPairWait bounds the wait for a CA key whose certificate is stored:
	// the creator stores the certificate and then the key, each write
	// waiting at most ackWait for the alive nodes.
	caPairWait = 30 * time.Second
	// caCreateIdle releases a creation lock this long after the last CA
	// file was stored when no intermediate.key follows.
	caCreateIdle = 10 * time.Second
	// caPollInterval is how often a waiting Load looks at the store again.
	caPollInterval = 50 * time.Millisecond
)

// caLockWait bounds the wait for another node's creation lock: it expires
// LockTTL after its holder stopped refreshing it.
func (s *Storage) caLockWait() time.Duration {
	return 3 * time.Duration(s.LockTTL)
}

// caCreations are the CA creations this storage instance holds the lock
// of, by CA id.
type caCreations struct {
	pairWait time.Duration // see caPairWait
	idle     time.Duration // see caCreateIdle

	mu   sync.Mutex // guards byID
	byID map[string]*caCreation
}

func newCACreations() *caCreations {
	return &caCreations{pairWait: caPairWait, idle: caCreateIdle, byID: make(map[string]*caCreation)}
}

// caCreation is one held creation lock.
type caCreation struct {
	lock string
	idle *time.Timer // releases the lock when no more CA files come
}

// caFile parses a key of a pki CA file, "pki/authorities/<id>/<name>",
// where name is root.crt, root.key, intermediate.crt or intermediate.key.
func caFile(key string) (id, pair string, isKey, ok bool) {
	parts := strings.Split(key, "/")
	if len(parts) != 4 || parts[0] != "pki" || parts[1] != "authorities" || parts[2] == "" {
		return "", "", false, false
	}
	switch parts[3] {
	case "root.crt", "intermediate.crt":
		return parts[2], strings.TrimSuffix(parts[3], ".crt"), false, true
	case "root.key", "intermediate.key":
		return parts[2], strings.TrimSuffix(parts[3], ".key"), true, true
	}
	return "", "", false, false
}

func caPath(id, name string) string { return "pki/authorities/" + id + "/" + name }

func caLockName(id string) string { return "pki_create_" + id }

// creating reports whether this instance holds the creation lock of CA id.
func (s *Storage) creating(id string) bool {
	s.cas.mu.Lock()
	defer s.cas.mu.Unlock()
	_, ok := s.cas.byID[id]
	return ok
}

// awaitCA is called by Load before it reads key, a CA file of CA id: it
// makes the first creation of the CA happen once in the circle and waits
// for a CA key that is on its way (see the comment at the top).
func (s *Storage) awaitCA(ctx context.Context, key, id, pair string, isKey bool) error {
	if s.creating(id) {
		return nil // our own creation: plain reads
	}
	if isKey {
		return s.awaitPair(ctx, id, pair)
	}
	if _, err := s.load(key); err == nil {
		return nil
	}
	lock := caLockName(id)
	lctx, cancel := context.WithTimeout(ctx, s.caLockWait())
	defer cancel()
	if err := s.Lock(lctx, lock); err != nil {
		return fmt.Errorf("waiting for another node to create the CA %s: %w", id, err)
	}
	if _, err := s.load(key); err == nil {
		s.logger.Info("using the CA another node created", zap.String("ca", id), zap.String("key", key))
		if err := s.Unlock(context.WithoutCancel(ctx), lock); err != nil {
			s.logger.Warn("releasing the CA creation lock", zap.String("ca", id), zap.Error(err))
		}
		return nil
	}
	s.logger.Info("creating the CA for the circle", zap.String("ca", id), zap.String("missing", key))
	s.cas.mu.Lock()
	c := &caCreation{lock: lock}
	c.idle = time.AfterFunc(s.cas.idle, func() { s.endCreation(id, "no more CA files stored") })
	s.cas.byID[id] = c
	s.cas.mu.Unlock()
	return nil
}

// caStored is called by Store after it stored key, a CA file of CA id.
func (s *Storage) caStored(id, key string) {
	s.cas.mu.Lock()
	c, ok := s.cas.byID[id]
	if ok {
		c.idle.Reset(s.cas.idle)
	}
	s.cas.mu.Unlock()
	if ok && key == caPath(id, "intermediate.key") {
		s.endCreation(id, "CA created")
	}
}

// endCreation releases the creation lock of CA id, if this instance holds it.
func (s *Storage) endCreation(id, why string) {
	s.cas.mu.Lock()
	c, ok := s.cas.byID[id]
	delete(s.cas.byID, id)
	s.cas.mu.Unlock()
	if !ok {
		return
	}
	c.idle.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), s.ackWait)
	defer cancel()
	if err := s.Unlock(ctx, c.lock); err != nil {
		s.logger.Warn("releasing the CA creation lock", zap.String("ca", id), zap.Error(err))
		return
	}
	s.logger.Info("released the CA creation lock", zap.String("ca", id), zap.String("why", why))
}

// endCreations releases every creation lock this instance holds.
func (s *Storage) endCreations() {
	if s.cas == nil {
		return
	}
	s.cas.mu.Lock()
	var ids []string
	for id := range s.cas.byID {
		ids = append(ids, id)
	}
	s.cas.mu.Unlock()
	for _, id := range ids {
		s.endCreation(id, "storage cleaned up")
	}
}

// awaitPair waits, at most caPairWait, until the key of pair ("root" or
// "intermediate") of CA id matches its stored certificate. Without a stored
// certificate it returns at once (nothing to wait for). A key that is still
// missing when the wait ends is left to Load to report; a key that does not
// match its certificate is an error, since signing with it would give
// certificates nobody can verify.
func (s *Storage) awaitPair(ctx context.Context, id, pair string) error {
	deadline := time.Now().Add(s.cas.pairWait)
	tick := time.NewTicker(caPollInterval)
	defer tick.Stop()
	logged := false
	for {
		err := s.pairMatches(id, pair)
		if err == nil || errors.Is(err, errNoCert) {
			if logged {
				s.logger.Info("CA key arrived", zap.String("ca", id), zap.String("pair", pair))
			}
			return nil
		}
		if time.Now().After(deadline) {
			if errors.Is(err, errNoKey) {
				return nil
			}
			return fmt.Errorf("CA %s: %w", id, err)
		}
		if !logged {
			s.logger.Info("waiting for the CA key to arrive", zap.String("ca", id), zap.String("pair", pair), zap.Error(err))
			logged = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the %s key of CA %s: %w", pair, id, context.Cause(ctx))
		case <-tick.C:
		}
	}
}

var (
	errNoCert = errors.New("no certificate stored")
	errNoKey  = errors.New("certificate stored, its key not yet")
)

// pairMatches checks that the stored key of pair matches its stored
// certificate (the first of the chain).
func (s *Storage) pairMatches(id, pair string) error {
	certPEM, err := s.load(caPath(id, pair+".crt"))
	if err != nil {
		return errNoCert
	}
	keyPEM, err := s.load(caPath(id, pair+".key"))
	if err != nil {
		return errNoKey
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return fmt.Errorf("%s.crt: no PEM certificate", pair)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fmt.Errorf("%s.crt: %w", pair, err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return fmt.Errorf("%s.key: no PEM private key", pair)
	}
	priv, err := parsePrivateKey(kb)
	if err != nil {
		return fmt.Errorf("%s.key: %w", pair, err)
	}
	signer, ok := priv.(crypto.Signer)
	if !ok {
		return fmt.Errorf("%s.key: not a signing key", pair)
	}
	pub, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return fmt.Errorf("%s.key: %w", pair, err)
	}
	if !bytes.Equal(pub, cert.RawSubjectPublicKeyInfo) {
		return fmt.Errorf("the stored %s certificate and key do not match", pair)
	}
	return nil
}
