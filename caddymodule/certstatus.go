package caddymodule

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/homecircle/circle/replicator"
)

// bucketCertStatus holds, per certificate identifier, the last issuance
// outcome seen by any node: who obtained or renewed it last and the last
// error. Written (best effort, no acknowledgement wait) from the tls app's
// cert_obtained and cert_failed events.
const bucketCertStatus = "certstatus"

// certEventRecord is the value of a key in bucket "certstatus".
type certEventRecord struct {
	LastSuccess     time.Time `json:"last_success,omitzero"`
	LastSuccessNode string    `json:"last_success_node,omitempty"`
	LastRenewal     bool      `json:"last_renewal,omitempty"`
	LastError       string    `json:"last_error,omitempty"`
	LastErrorTime   time.Time `json:"last_error_time,omitzero"`
	LastErrorNode   string    `json:"last_error_node,omitempty"`
}

// maxStatusError bounds the stored error text.
const maxStatusError = 1024

// certEvents records the tls app's certificate events in the store. It
// implements caddyevents.Handler; Handle is called synchronously by the
// emitter, so it only does a local write.
type certEvents struct {
	node     *replicator.Node
	nodeName string
	logger   *zap.Logger
}

// subscribeCertEvents subscribes to the certificate events of the config's
// tls app, so that the status shows the last issuance and error.
func (s *Storage) subscribeCertEvents(ctx caddy.Context, nodeName string) {
	evApp, err := ctx.App("events")
	if err != nil {
		s.logger.Warn("no events app; certificate errors will not show in the status", zap.Error(err))
		return
	}
	ev, ok := evApp.(*caddyevents.App)
	if !ok {
		return
	}
	h := &certEvents{node: s.node, nodeName: nodeName, logger: s.logger}
	for _, name := range []string{"cert_obtained", "cert_failed"} {
		if err := ev.On(name, h); err != nil {
			s.logger.Warn("subscribing to certificate events", zap.String("event", name), zap.Error(err))
		}
	}
}

// Handle implements caddyevents.Handler.
func (h *certEvents) Handle(_ context.Context, e caddy.Event) error {
	id, _ := e.Data["identifier"].(string)
	if id == "" || len(id) > 512 {
		return nil
	}
	var rec certEventRecord
	if r, err := h.node.Get(bucketCertStatus, id); err == nil {
		json.Unmarshal(r.Value, &rec) // a bad old record is replaced
	}
	now := time.Now().UTC()
	switch e.Name() {
	case "cert_obtained":
		rec.LastSuccess, rec.LastSuccessNode = now, h.nodeName
		rec.LastRenewal, _ = e.Data["renewal"].(bool)
		rec.LastError, rec.LastErrorTime, rec.LastErrorNode = "", time.Time{}, ""
	case "cert_failed":
		msg := "unknown error"
		if err, ok := e.Data["error"].(error); ok && err != nil {
			msg = err.Error()
		}
		if len(msg) > maxStatusError {
			msg = msg[:maxStatusError] + "..."
		}
		rec.LastError, rec.LastErrorTime, rec.LastErrorNode = msg, now, h.nodeName
	default:
		return nil
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil
	}
	if err := h.node.PutAsync(bucketCertStatus, id, b); err != nil {
		h.logger.Warn("recording certificate status", zap.String("identifier", id), zap.Error(err))
	}
	return nil
}

// certJSON is a managed certificate as GET /circle/status shows it.
type certJSON struct {
	Names     []string  `json:"names"`
	Issuer    string    `json:"issuer"` // certmagic's issuer key, e.g. the ACME directory
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	// RenewedBy is the node that stored this certificate (obtained or
	// renewed it last), RenewedAt when.
	RenewedBy string    `json:"renewed_by"`
	RenewedAt time.Time `json:"renewed_at"`
	// LastError is the last issuance/renewal error of any of its names
	// since the last success, with the node and time it happened.
	LastError     string    `json:"last_error,omitempty"`
	LastErrorNode string    `json:"last_error_node,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
	// Problem says why the stored certificate is unusable (corrupted or
	// truncated record); such a certificate is not served.
	Problem string `json:"problem,omitempty"`
}

// lockJSON is a lock lease as GET /circle/status shows it.
type lockJSON struct {
	Name    string    `json:"name"`
	Owner   string    `json:"owner"`
	Expires time.Time `json:"expires"`
	Expired bool      `json:"expired,omitempty"`
}

// certificatesStatus lists the certificates in the circle's storage, with
// who stored them and the last error recorded for their names.
func certificatesStatus(n *replicator.Node) []certJSON {
	recs, err := n.List(bucketCerts, "certificates/")
	if err != nil {
		return nil
	}
	events := map[string]certEventRecord{}
	if evs, err := n.List(bucketCertStatus, ""); err == nil {
		for _, r := range evs {
			var e certEventRecord
			if json.Unmarshal(r.Value, &e) == nil {
				events[r.Key] = e
			}
		}
	}
	out := []certJSON{}
	for _, r := range recs {
		if !strings.HasSuffix(r.Key, ".crt") {
			continue
		}
		parts := strings.Split(r.Key, "/")
		c := certJSON{
			RenewedBy: r.Version.Node,
			RenewedAt: versionTime(r.Version).UTC(),
		}
		if len(parts) >= 4 {
			c.Issuer = path.Join(parts[1 : len(parts)-2]...)
			c.Names = []string{parts[len(parts)-2]}
		}
		if leaf, err := parseCertChain(r.Value); err != nil {
			c.Problem = err.Error()
		} else {
			c.Names = append(append([]string{}, leaf.DNSNames...), ipStrings(leaf)...)
			c.Serial = leaf.SerialNumber.Text(16)
			c.NotBefore, c.NotAfter = leaf.NotBefore.UTC(), leaf.NotAfter.UTC()
		}
		for _, name := range c.Names {
			if e, ok := events[name]; ok && e.LastError != "" && e.LastErrorTime.After(c.LastErrorTime) {
				c.LastError, c.LastErrorNode, c.LastErrorTime = e.LastError, e.LastErrorNode, e.LastErrorTime
			}
		}
		out = append(out, c)
	}
	// Names that never got a certificate but failed show too.
	have := map[string]bool{}
	for _, c := range out {
		for _, name := range c.Names {
			have[name] = true
		}
	}
	for name, e := range events {
		if !have[name] && e.LastError != "" {
			out = append(out, certJSON{Names: []string{name}, LastError: e.LastError,
				LastErrorNode: e.LastErrorNode, LastErrorTime: e.LastErrorTime, Problem: "no certificate yet"})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := strings.Join(out[i].Names, ","), strings.Join(out[j].Names, ",")
		if a != b {
			return a < b
		}
		return out[i].Issuer < out[j].Issuer
	})
	return out
}

// locksStatus lists the locks held in the circle as this node sees them;
// the expiry is this node's own reckoning (its clock plus what is left of
// its grant).
func locksStatus(n *replicator.Node) []lockJSON {
	now := time.Now()
	var out []lockJSON
	for _, g := range n.Locks() {
		out = append(out, lockJSON{Name: g.Name, Owner: g.Owner, Expires: now.Add(g.Remaining).UTC().Truncate(time.Millisecond), Expired: g.Remaining <= 0})
	}
	return out
}

func ipStrings(c *x509.Certificate) []string {
	var out []string
	for _, ip := range c.IPAddresses {
		out = append(out, ip.String())
	}
	return out
}

// errCorruptRecord marks a stored record that does not have the format its
// key promises.
var errCorruptRecord = errors.New("corrupted or truncated record")

// parseCertChain parses a PEM certificate chain strictly: at least one
// block, only CERTIFICATE blocks that all parse, nothing else but
// whitespace. It returns the leaf.
func parseCertChain(b []byte) (*x509.Certificate, error) {
	var leaf *x509.Certificate
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: unexpected PEM block %q", errCorruptRecord, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errCorruptRecord, err)
		}
		if leaf == nil {
			leaf = c
		}
	}
	if leaf == nil {
		return nil, fmt.Errorf("%w: no certificate", errCorruptRecord)
	}
	if len(strings.TrimSpace(string(rest))) != 0 {
		return nil, fmt.Errorf("%w: trailing data after the certificates", errCorruptRecord)
	}
	return leaf, nil
}

// checkRecordFormat checks that a value has the format its key promises:
// PEM certificates for ".crt", one PEM private key for ".key", JSON for
// ".json". Other keys are not checked.
func checkRecordFormat(key string, value []byte) error {
	switch {
	case strings.HasSuffix(key, ".crt"):
		_, err := parseCertChain(value)
		return err
	case strings.HasSuffix(key, ".key"):
		block, rest := pem.Decode(value)
		if block == nil || !strings.HasSuffix(block.Type, "PRIVATE KEY") {
			return fmt.Errorf("%w: no PEM private key", errCorruptRecord)
		}
		if len(strings.TrimSpace(string(rest))) != 0 {
			return fmt.Errorf("%w: trailing data after the key", errCorruptRecord)
		}
		if _, err := parsePrivateKey(block); err != nil {
			return fmt.Errorf("%w: %v", errCorruptRecord, err)
		}
	case strings.HasSuffix(key, ".json"):
		if !json.Valid(value) {
			return fmt.Errorf("%w: invalid JSON", errCorruptRecord)
		}
	}
	return nil
}

// parsePrivateKey parses the DER of a PEM private key block of any type
// certmagic writes.
func parsePrivateKey(block *pem.Block) (any, error) {
	switch block.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		return x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return x509.ParsePKCS8PrivateKey(block.Bytes)
	}
}

// Interface guards
var _ caddyevents.Handler = (*certEvents)(nil)
