package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/homecircle/circle/caddymodule/circlenode"
)

func init() {
	caddy.RegisterModule(Transport{})
}

// Transport is `http.reverse_proxy.transport.circle`: it proxies HTTP to a
// circle service over the mesh. The upstream's host is the service name
// (the port Caddy adds is ignored):
//
//	reverse_proxy forgejo {
//		transport circle
//	}
//
// If this node offers the service (`service forgejo 127.0.0.1:3000` in its
// circle block) the transport dials the upstream directly; otherwise it
// opens a mesh stream to a connected node that offers it, the one that
// answered last time first, then by path quality (direct, punched,
// relayed), so it fails over between the nodes offering the same name.
// When no node offers it, reverse_proxy answers 502 Bad Gateway.
type Transport struct {
	// DialTimeout bounds connecting to the service (local upstream or
	// mesh stream). Default: 10s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	node *sharedNode
	rt   *http.Transport
}

// CaddyModule returns the Caddy module information.
func (Transport) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.transport.circle",
		New: func() caddy.Module { return new(Transport) },
	}
}

// Provision finds this process's circle node and sets up the HTTP client.
func (t *Transport) Provision(ctx caddy.Context) error {
	appIface, err := ctx.App("circle")
	if err != nil {
		return fmt.Errorf("transport circle needs the circle app (the circle global option): %w", err)
	}
	app, ok := appIface.(*App)
	if !ok || app.node == nil {
		return errors.New("transport circle: the circle app is not provisioned")
	}
	t.node = app.node
	t.rt = newServiceTransport(t.node, time.Duration(t.DialTimeout))
	return nil
}

// newServiceTransport returns an http.Transport whose connections are
// circle service streams: the dialed host is the service name.
func newServiceTransport(sn *sharedNode, timeout time.Duration) *http.Transport {
	if timeout <= 0 {
		timeout = circlenode.ServiceDialTimeout
	}
	return &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				host = addr
			}
			host = strings.ToLower(host)
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			c, err := sn.DialService(ctx, host)
			if err != nil {
				// A dial error: reverse_proxy may retry it (lb_try_duration)
				// and answers 502 Bad Gateway.
				return nil, reverseproxy.NewDialError(err)
			}
			return c, nil
		},
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       60 * time.Second,
		ResponseHeaderTimeout: 0,
		ExpectContinueTimeout: time.Second,
	}
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "" {
		req.URL.Scheme = "http"
	}
	return t.rt.RoundTrip(req)
}

// Cleanup closes idle connections.
func (t *Transport) Cleanup() error {
	if t.rt != nil {
		t.rt.CloseIdleConnections()
	}
	return nil
}

// UnmarshalCaddyfile sets up the transport from Caddyfile tokens. Syntax:
//
//	transport circle {
//		dial_timeout <duration>
//	}
func (t *Transport) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume transport name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "dial_timeout":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur <= 0 {
				return d.Errf("bad dial_timeout %q", d.Val())
			}
			t.DialTimeout = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Transport)(nil)
	_ caddy.CleanerUpper    = (*Transport)(nil)
	_ http.RoundTripper     = (*Transport)(nil)
	_ caddyfile.Unmarshaler = (*Transport)(nil)
)
