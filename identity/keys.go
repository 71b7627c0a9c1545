package identity

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// keyRecordVersion is the format version of keys bucket values.
const keyRecordVersion = 1

// keySealInfo is the HKDF info label for the key that seals private signing
// keys at rest.
const keySealInfo = "circle identity keys v1"

// keyRecord is the value stored under keys/<kid>, as JSON:
//
//	{"v":1, "kid":"<16 hex>", "alg":"EdDSA",
//	 "public":"<base64 32-byte Ed25519 public key>",
//	 "sealed":"<base64 12-byte nonce || AES-256-GCM(32-byte Ed25519 seed)>",
//	 "created":"<RFC 3339>", "not_after":"<RFC 3339>"}
//
// The GCM additional data is "circle identity key " + kid, so a sealed key
// cannot be moved to another kid. not_after is created+KeyRotation+SessionTTL:
// the last moment a token signed by the key can still be valid.
type keyRecord struct {
	V        int       `json:"v"`
	KID      string    `json:"kid"`
	Alg      string    `json:"alg"`
	Public   []byte    `json:"public"`
	Sealed   []byte    `json:"sealed"`
	Created  time.Time `json:"created"`
	NotAfter time.Time `json:"not_after"`
}

// sigKey is a key in the in-memory key set.
type sigKey struct {
	kid      string
	pub      ed25519.PublicKey
	signer   jose.Signer // nil if the private key could not be unsealed
	created  time.Time
	notAfter time.Time
}

// deriveSealAEAD returns the AES-256-GCM AEAD used to seal private keys.
func deriveSealAEAD(secret []byte) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, secret, nil, keySealInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving key sealing key: %w", err)
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func sealAAD(kid string) []byte { return []byte("circle identity key " + kid) }

// newKeyRecord makes a fresh Ed25519 key, sealed.
func (s *Service) newKeyRecord(now time.Time) (keyRecord, error) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		return keyRecord{}, fmt.Errorf("generating signing key: %w", err)
	}
	kid := hex.EncodeToString(randomBytes(8))
	nonce := randomBytes(s.seal.NonceSize())
	sealed := s.seal.Seal(nonce, nonce, priv.Seed(), sealAAD(kid))
	return keyRecord{
		V:        keyRecordVersion,
		KID:      kid,
		Alg:      string(jose.EdDSA),
		Public:   pub,
		Sealed:   sealed,
		Created:  now.UTC(),
		NotAfter: now.Add(s.cfg.KeyRotation + s.cfg.SessionTTL).UTC(),
	}, nil
}

// parseKey checks a key record and builds the in-memory key; the private
// half is unsealed if possible (a key sealed under another secret still
// verifies, it just cannot sign).
func (s *Service) parseKey(kid string, value []byte) (*sigKey, error) {
	var rec keyRecord
	if err := json.Unmarshal(value, &rec); err != nil {
		return nil, fmt.Errorf("decoding key %s: %w", kid, err)
	}
	if rec.V != keyRecordVersion || rec.KID != kid || rec.Alg != string(jose.EdDSA) || len(rec.Public) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("key %s: unsupported or inconsistent record: %w", kid, ErrInvalidInput)
	}
	k := &sigKey{kid: kid, pub: ed25519.PublicKey(rec.Public), created: rec.Created, notAfter: rec.NotAfter}
	ns := s.seal.NonceSize()
	if len(rec.Sealed) > ns {
		seed, err := s.seal.Open(nil, rec.Sealed[:ns], rec.Sealed[ns:], sealAAD(kid))
		if err == nil && len(seed) == ed25519.SeedSize {
			priv := ed25519.NewKeyFromSeed(seed)
			if priv.Public().(ed25519.PublicKey).Equal(k.pub) {
				signer, err := jose.NewSigner(
					jose.SigningKey{Algorithm: jose.EdDSA, Key: jose.JSONWebKey{Key: priv, KeyID: kid}},
					(&jose.SignerOptions{}).WithType("JWT"))
				if err == nil {
					k.signer = signer
				}
			}
		}
	}
	if k.signer == nil {
		s.log.Warn("signing key cannot be unsealed (different circle secret?); using it to verify only", "kid", kid)
	}
	return k, nil
}

// addKey puts k into the key set (replacing a key with the same kid).
func (s *Service) addKey(k *sigKey) {
	s.keysMu.Lock()
	defer s.keysMu.Unlock()
	s.keys[k.kid] = k
	s.rebuildKeysLocked()
}

// removeKey drops kid from the key set.
func (s *Service) removeKey(kid string) {
	s.keysMu.Lock()
	defer s.keysMu.Unlock()
	if _, ok := s.keys[kid]; ok {
		delete(s.keys, kid)
		s.rebuildKeysLocked()
	}
}

// rebuildKeysLocked recomputes the signing key and the JWKS. keysMu must be
// held for writing.
func (s *Service) rebuildKeysLocked() {
	now := s.cfg.Now()
	s.signing = nil
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	kids := make([]string, 0, len(s.keys))
	for kid := range s.keys {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	for _, kid := range kids {
		k := s.keys[kid]
		if !now.Before(k.notAfter) {
			continue
		}
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.pub, KeyID: kid, Algorithm: string(jose.EdDSA), Use: "sig"})
		if k.signer != nil && (s.signing == nil || k.created.After(s.signing.created) ||
			(k.created.Equal(s.signing.created) && k.kid > s.signing.kid)) {
			s.signing = k
		}
	}
	b, err := json.Marshal(set)
	if err != nil { // cannot happen for Ed25519 keys
		s.log.Error("encoding jwks", "error", err)
		return
	}
	s.jwks = b
}

// verifyKey returns the public key for kid if it is in the key set and
// still valid at now. An unknown kid is looked up once in the store (a key
// created elsewhere whose watch event has not arrived yet, or that was made
// while this Service was not running).
func (s *Service) verifyKey(kid string, now time.Time) (ed25519.PublicKey, bool) {
	s.keysMu.RLock()
	k, ok := s.keys[kid]
	s.keysMu.RUnlock()
	if !ok {
		v, err := s.store.Get(bucketKeys, kid)
		if err != nil {
			return nil, false
		}
		nk, err := s.parseKey(kid, v)
		if err != nil {
			s.log.Warn("ignoring bad key record", "kid", kid, "error", err)
			return nil, false
		}
		s.addKey(nk)
		k = nk
	}
	if !now.Before(k.notAfter) {
		return nil, false
	}
	return k.pub, true
}

// loadKeys reads the whole keys bucket into the key set.
func (s *Service) loadKeys() error {
	entries, err := s.store.List(bucketKeys, "")
	if err != nil {
		return fmt.Errorf("listing keys: %w", err)
	}
	for _, e := range entries {
		k, err := s.parseKey(e.Key, e.Value)
		if err != nil {
			s.log.Warn("ignoring bad key record", "kid", e.Key, "error", err)
			continue
		}
		s.addKey(k)
	}
	return nil
}

// onKeyEvent is the keys bucket watch callback.
func (s *Service) onKeyEvent(kid string, value []byte, deleted bool) {
	if deleted {
		s.removeKey(kid)
		return
	}
	k, err := s.parseKey(kid, value)
	if err != nil {
		s.log.Warn("ignoring bad key record", "kid", kid, "error", err)
		return
	}
	s.addKey(k)
}

// RotateKey creates a new signing key, stores it (acknowledged write) and
// signs with it from now on, here at once and on other nodes as soon as the
// record reaches them. Older keys keep verifying until their not_after.
func (s *Service) RotateKey(ctx context.Context) (kid string, err error) {
	now := s.cfg.Now()
	s.keysMu.RLock()
	if s.signing != nil && !now.After(s.signing.created) {
		// Keep "newest" well defined when the clock has not moved (or went
		// back): the new key must sort after the one it replaces.
		now = s.signing.created.Add(time.Millisecond)
	}
	s.keysMu.RUnlock()
	rec, err := s.newKeyRecord(now)
	if err != nil {
		return "", fmt.Errorf("identity: rotating key: %w", err)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return "", fmt.Errorf("identity: rotating key: %w", err)
	}
	k, err := s.parseKey(rec.KID, b)
	if err != nil {
		return "", fmt.Errorf("identity: rotating key: %w", err)
	}
	if err := s.store.Put(ctx, bucketKeys, rec.KID, b); err != nil {
		// The record may still be stored locally and replicating; the key is
		// only used if it is readable back.
		if _, gerr := s.store.Get(bucketKeys, rec.KID); gerr == nil {
			s.addKey(k)
		}
		return "", fmt.Errorf("identity: storing new signing key: %w", err)
	}
	s.addKey(k)
	s.log.Info("signing key created", "kid", rec.KID)
	return rec.KID, nil
}

// JWKS returns the JSON Web Key Set ({"keys":[...]}) of every public key
// that can still verify a live token: Ed25519 keys as "kty":"OKP",
// "crv":"Ed25519", with "use":"sig", "alg":"EdDSA" and "kid".
func (s *Service) JWKS() []byte {
	s.keysMu.RLock()
	defer s.keysMu.RUnlock()
	if s.jwks == nil {
		return []byte(`{"keys":[]}`)
	}
	return slices.Clone(s.jwks)
}

// signingKey returns the newest key with a usable private half.
func (s *Service) signingKey() (*sigKey, error) {
	s.keysMu.RLock()
	defer s.keysMu.RUnlock()
	if s.signing == nil || !s.cfg.Now().Before(s.signing.notAfter) {
		return nil, fmt.Errorf("no usable signing key: %w", ErrNotStarted)
	}
	return s.signing, nil
}

// pruneKeys forgets keys that can no longer verify anything and deletes
// their records.
func (s *Service) pruneKeys(ctx context.Context, now time.Time) {
	s.keysMu.Lock()
	var old []string
	for kid, k := range s.keys {
		if !now.Before(k.notAfter) {
			old = append(old, kid)
			delete(s.keys, kid)
		}
	}
	s.rebuildKeysLocked()
	s.keysMu.Unlock()
	for _, kid := range old {
		if err := s.store.Delete(ctx, bucketKeys, kid); err != nil && !errors.Is(err, ErrNotFound) {
			s.log.Warn("deleting retired key", "kid", kid, "error", err)
		}
	}
}
