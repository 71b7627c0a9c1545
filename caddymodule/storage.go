package caddymodule

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/homecircle/circle/replicator"
)

func init() {
	caddy.RegisterModule(Storage{})
}

// bucketCerts holds the certmagic keys. Locks live in the replicator's
// lease buckets ("locks", "lockgrants", "lockvoters"; replicator/lease.go).
const bucketCerts = "certs"

// Storage defaults.
const (
	// DefaultLockTTL is how long a lock lease lasts without a refresh.
	DefaultLockTTL = 30 * time.Second
	// DefaultLockPoll is how often a waiting Lock looks at the lease again.
	DefaultLockPoll = time.Second
	// defaultAckWait bounds how long a write waits for every alive node.
	defaultAckWait = 5 * time.Second
)

// sealedVersion is the first byte of a value encrypted at rest. Layout:
// version (1) | nonce (12) | AES-256-GCM ciphertext and tag, with the
// additional data "circle certs v1\x00" + key so values cannot be moved
// between keys.
const sealedVersion = 1

// Storage is `caddy.storage.circle`: certmagic storage on the circle's
// replicated store, so every node serves the same certificates and the same
// internal CA. Keys are stored in bucket "certs"; values of keys ending in
// ".key" are encrypted at rest with AES-256-GCM under
// HKDF-SHA256(circle secret, "circle storage keys v1"). Locks are
// replicator.Leases: granted by a majority of the circle's nodes, expiring
// by durations measured locally, renewed and released only by their holder
// (docs/INTERNALS.md, "Locks").
//
// It needs the `circle` app (the global option), whose node it uses.
type Storage struct {
	// LockTTL is how long a lock lease lasts unless refreshed; holders
	// refresh it every third of it. Default: 30s.
	LockTTL caddy.Duration `json:"lock_ttl,omitempty"`

	// LockPollInterval is how often a waiting Lock checks the lease.
	// Default: 1s.
	LockPollInterval caddy.Duration `json:"lock_poll_interval,omitempty"`

	node    *replicator.Node
	aead    cipher.AEAD
	logger  *zap.Logger
	ackWait time.Duration      // bound of the all-alive acknowledgement wait
	locks   *replicator.Leases // this instance's lock leases

	cas *caCreations // CA creations this instance holds the lock of (castart.go)
}

// CaddyModule returns the Caddy module information.
func (Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.circle",
		New: func() caddy.Module { return new(Storage) },
	}
}

// Provision gets the circle app, which opens (or reuses) the node. Storage
// is provisioned before the apps, and the apps' raw config is already
// loaded, so asking the context for the app provisions it right here.
func (s *Storage) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	appIface, err := ctx.AppIfConfigured("circle")
	if err != nil {
		return fmt.Errorf("storage circle needs the circle global option: %w", err)
	}
	app, ok := appIface.(*App)
	if !ok || app.node == nil {
		return errors.New("storage circle: the circle app has no node")
	}
	if err := s.init(app.node.Replicator(), app.Name, app.node.StorageKey()); err != nil {
		return err
	}
	s.subscribeCertEvents(ctx, app.Name)
	return nil
}

// init sets up the storage on node; it is Provision without Caddy.
func (s *Storage) init(node *replicator.Node, nodeName string, key []byte) error {
	if s.logger == nil {
		s.logger = zap.NewNop()
	}
	if s.LockTTL <= 0 {
		s.LockTTL = caddy.Duration(DefaultLockTTL)
	}
	if s.LockPollInterval <= 0 {
		s.LockPollInterval = caddy.Duration(DefaultLockPoll)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return fmt.Errorf("loading storage key: %w", err)
	}
	s.aead, err = cipher.NewGCM(block)
	if err != nil {
		return fmt.Errorf("loading storage key: %w", err)
	}
	if s.ackWait <= 0 {
		s.ackWait = defaultAckWait
	}
	s.node = node
	s.cas = newCACreations()
	logger := s.logger
	s.locks = replicator.NewLeases(node, replicator.LeaseConfig{
		Owner: nodeName + "/" + randomHex(8),
		TTL:   time.Duration(s.LockTTL),
		Poll:  time.Duration(s.LockPollInterval),
		OnLost: func(name string, err error) {
			logger.Error("lock lease lost", zap.String("lock", name), zap.Error(err))
		},
	})
	return nil
}

// Cleanup stops the lease refreshers of this instance; leases it still
// holds then expire on their own.
func (s *Storage) Cleanup() error {
	s.endCreations()
	if s.locks != nil {
		s.locks.Close()
	}
	return nil
}

// CertMagicStorage returns the storage itself.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) {
	return s, nil
}

// put writes an acknowledged record. An acknowledgement timeout is not a
// failure for certmagic: the record is durable here and keeps replicating.
func (s *Storage) put(ctx context.Context, bucket, key string, value []byte) error {
	err := s.node.Put(ctx, bucket, key, value)
	if errors.Is(err, replicator.ErrAckTimeout) {
		s.logger.Warn("stored locally, replication not yet acknowledged", zap.String("key", key))
		return nil
	}
	return err
}

// del tombstones a record, with put's tolerance for acknowledgement timeouts.
func (s *Storage) del(ctx context.Context, bucket, key string) error {
	err := s.node.Delete(ctx, bucket, key)
	switch {
	case errors.Is(err, replicator.ErrAckTimeout):
		s.logger.Warn("deleted locally, replication not yet acknowledged", zap.String("key", key))
		return nil
	case errors.Is(err, replicator.ErrNotFound):
		return nil
	}
	return err
}

func normKey(key string) string {
	return strings.Trim(key, "/")
}

// sensitive reports whether the value of key is encrypted at rest.
func sensitive(key string) bool {
	return strings.HasSuffix(key, ".key")
}

func additionalData(key string) []byte {
	return []byte("circle certs v1\x00" + key)
}

func (s *Storage) seal(key string, plain []byte) []byte {
	out := make([]byte, 1+s.aead.NonceSize(), 1+s.aead.NonceSize()+len(plain)+s.aead.Overhead())
	out[0] = sealedVersion
	rand.Read(out[1:])
	return s.aead.Seal(out, out[1:], plain, additionalData(key))
}

func (s *Storage) open(key string, sealed []byte) ([]byte, error) {
	ns := s.aead.NonceSize()
	if len(sealed) < 1+ns+s.aead.Overhead() || sealed[0] != sealedVersion {
		return nil, fmt.Errorf("decrypting %s: unknown format", key)
	}
	plain, err := s.aead.Open(nil, sealed[1:1+ns], sealed[1+ns:], additionalData(key))
	if err != nil {
		return nil, fmt.Errorf("decrypting %s: wrong circle secret or corrupted value", key)
	}
	return plain, nil
}

// Store implements certmagic.Storage. Certificates and ACME challenge
// tokens are stored with all-alive acknowledgement: Store returns once every
// alive node running the storage holds the value (or after a bounded wait,
// logged), since a token must be answerable by any node before the CA
// validates, and a certificate must be everywhere before the lock of its
// issuance is released. Other keys are acknowledged by `replicas` nodes.
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	key = normKey(key)
	if key == "" {
		return errors.New("storage circle: empty key")
	}
	if sensitive(key) {
		value = s.seal(key, value)
	}
	var err error
	if needsAllAlive(key) {
		err = s.putAll(ctx, bucketCerts, key, value, s.ackWait)
	} else {
		err = s.put(ctx, bucketCerts, key, value)
	}
	if err != nil {
		return fmt.Errorf("storing %s: %w", key, err)
	}
	if id, _, _, ok := caFile(key); ok {
		s.caStored(id, key)
	}
	return nil
}

// Load implements certmagic.Storage. A missing key gives an error wrapping
// fs.ErrNotExist.
//
// Values are checked against the format their key promises (PEM
// certificates for .crt, a PEM private key for .key, JSON for .json; keys
// are also authenticated by their encryption), so a corrupted or truncated
// record is never handed to certmagic. Under "certificates/" such a record
// counts as missing (fs.ErrNotExist), so the certificate is obtained again
// under the issuance lock; elsewhere (the CA, ACME accounts) it is an
// error, because replacing a CA root or an account silently is worse.
//
// The pki CA files go through awaitCA first (castart.go): a missing CA
// certificate is created by one node at a time, under a circle lock, and a
// CA key whose certificate is stored is waited for until it arrives.
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	if id, pair, isKey, ok := caFile(normKey(key)); ok {
		if err := s.awaitCA(ctx, normKey(key), id, pair, isKey); err != nil {
			return nil, fmt.Errorf("loading %s: %w", normKey(key), err)
		}
	}
	value, err := s.load(key)
	if err != nil {
		return nil, err
	}
	if err := checkRecordFormat(normKey(key), value); err != nil {
		s.logger.Error("unusable record in the store", zap.String("key", normKey(key)), zap.Error(err))
		if strings.HasPrefix(normKey(key), "certificates/") {
			return nil, fmt.Errorf("loading %s: %w (%w)", normKey(key), fs.ErrNotExist, err)
		}
		return nil, fmt.Errorf("loading %s: %w", normKey(key), err)
	}
	return value, nil
}

// load reads and, for sensitive keys, decrypts a record.
func (s *Storage) load(key string) ([]byte, error) {
	key = normKey(key)
	if key == "" {
		return nil, fmt.Errorf("loading the root: %w", fs.ErrNotExist)
	}
	rec, err := s.node.Get(bucketCerts, key)
	if errors.Is(err, replicator.ErrNotFound) {
		return nil, fmt.Errorf("loading %s: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", key, err)
	}
	if sensitive(key) {
		plain, err := s.open(key, rec.Value)
		if err != nil && strings.HasPrefix(key, "certificates/") {
			return nil, fmt.Errorf("%w (%w)", fs.ErrNotExist, err)
		}
		return plain, err
	}
	return rec.Value, nil
}

// Delete implements certmagic.Storage: it deletes key and, if key is a
// "directory", every key below it. Missing keys are not an error.
func (s *Storage) Delete(ctx context.Context, key string) error {
	key = normKey(key)
	var keys []string
	if key != "" {
		if _, err := s.node.Get(bucketCerts, key); err == nil {
			keys = append(keys, key)
		}
	}
	below, err := s.node.List(bucketCerts, dirPrefix(key))
	if err != nil {
		return fmt.Errorf("deleting %s: %w", key, err)
	}
	for _, r := range below {
		keys = append(keys, r.Key)
	}
	for _, k := range keys {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.del(ctx, bucketCerts, k); err != nil {
			return fmt.Errorf("deleting %s: %w", k, err)
		}
	}
	return nil
}

// dirPrefix is the key prefix of the "directory" key.
func dirPrefix(key string) string {
	if key == "" {
		return ""
	}
	return key + "/"
}

// Exists implements certmagic.Storage: key is a stored key or a prefix
// ("directory") of one. A corrupted record under "certificates/" does not
// exist (as for Load), so that certmagic obtains the certificate again
// rather than failing to load it.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	key = normKey(key)
	if key != "" {
		if _, err := s.node.Get(bucketCerts, key); err == nil {
			if strings.HasPrefix(key, "certificates/") {
				_, err := s.Load(ctx, key)
				return err == nil
			}
			return true
		}
	}
	below, err := s.node.List(bucketCerts, dirPrefix(key))
	return err == nil && len(below) > 0
}

// List implements certmagic.Storage like certmagic's FileStorage: the
// entries directly below dir (files and directories), or with recursive
// every file and directory below it. An empty or missing directory gives
// an error wrapping fs.ErrNotExist.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = normKey(dir)
	prefix := dirPrefix(dir)
	recs, err := s.node.List(bucketCerts, prefix)
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("listing %s: %w", dir, fs.ErrNotExist)
	}
	seen := make(map[string]bool)
	var out []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, r := range recs {
		rest := strings.TrimPrefix(r.Key, prefix)
		parts := strings.Split(rest, "/")
		if !recursive {
			add(path.Join(dir, parts[0]))
			continue
		}
		for i := range parts {
			add(path.Join(dir, strings.Join(parts[:i+1], "/")))
		}
	}
	sort.Strings(out)
	return out, ctx.Err()
}

// Stat implements certmagic.Storage. A directory is reported with
// IsTerminal false; a missing key gives an error wrapping fs.ErrNotExist.
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = normKey(key)
	rec, err := replicator.Record{}, replicator.ErrNotFound
	if key != "" {
		rec, err = s.node.Get(bucketCerts, key)
	}
	if err == nil {
		size := int64(len(rec.Value))
		if sensitive(key) {
			size -= int64(1 + s.aead.NonceSize() + s.aead.Overhead())
		}
		return certmagic.KeyInfo{
			Key:        key,
			Modified:   versionTime(rec.Version),
			Size:       max(size, 0),
			IsTerminal: true,
		}, nil
	}
	if !errors.Is(err, replicator.ErrNotFound) {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	below, err := s.node.List(bucketCerts, dirPrefix(key))
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	if len(below) == 0 {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, fs.ErrNotExist)
	}
	var newest time.Time
	for _, r := range below {
		if t := versionTime(r.Version); t.After(newest) {
			newest = t
		}
	}
	return certmagic.KeyInfo{Key: key, Modified: newest, IsTerminal: false}, nil
}

// versionTime is the wall-clock part of a hybrid logical clock version
// (milliseconds in the upper 48 bits).
func versionTime(v replicator.Version) time.Time {
	return time.UnixMilli(int64(v.Time >> 16))
}

// Lock implements certmagic.Locker on the circle's leases (see
// replicator.Leases): it waits until this instance holds name.
func (s *Storage) Lock(ctx context.Context, name string) error {
	return s.locks.Lock(ctx, name)
}

// TryLock implements certmagic.TryLocker: one attempt to take the lease.
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	return s.locks.TryLock(ctx, name)
}

// Unlock implements certmagic.Locker: it releases the lease if this
// instance holds it; otherwise it is an error and the lease is untouched.
func (s *Storage) Unlock(ctx context.Context, name string) error {
	return s.locks.Unlock(ctx, name)
}

// RenewLockLease implements certmagic.LockLeaseRenewer: the held lease on
// lockKey now lasts leaseDuration from now (and keeps being refreshed). It
// is an error if this instance does not hold the lease (any more).
func (s *Storage) RenewLockLease(ctx context.Context, lockKey string, leaseDuration time.Duration) error {
	err := s.locks.Renew(ctx, lockKey, leaseDuration)
	if err != nil {
		s.logger.Error("renewing lock lease", zap.String("lock", lockKey), zap.Error(err))
	}
	return err
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Interface guards
var (
	_ caddy.Module               = (*Storage)(nil)
	_ caddy.Provisioner          = (*Storage)(nil)
	_ caddy.CleanerUpper         = (*Storage)(nil)
	_ caddy.StorageConverter     = (*Storage)(nil)
	_ certmagic.Storage          = (*Storage)(nil)
	_ certmagic.TryLocker        = (*Storage)(nil)
	_ certmagic.LockLeaseRenewer = (*Storage)(nil)
)
