package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/homecircle/circle/caddymodule/circlenode"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("circle", parseGlobalCircle)

	httpcaddyfile.RegisterHandlerDirective("circle_portal", parseHandlerModule("http.handlers.circle_portal"))
	httpcaddyfile.RegisterHandlerDirective("circle_auth", parseHandlerModule("http.handlers.circle_auth"))
	// The portal answers its own routes before any authentication; the gate
	// sits with the other authentication handlers, ahead of everything that
	// produces a response (reverse_proxy, respond, file_server...).
	httpcaddyfile.RegisterDirectiveOrder("circle_portal", httpcaddyfile.Before, "basic_auth")
	httpcaddyfile.RegisterDirectiveOrder("circle_auth", httpcaddyfile.After, "basic_auth")
}

// parseGlobalCircle sets up the `circle` app from the global option of the
// same name; see App.UnmarshalCaddyfile for the syntax.
func parseGlobalCircle(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("the circle global option may appear only once")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{
		Name:  "circle",
		Value: caddyconfig.JSON(app, nil),
	}, nil
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens. Syntax:
//
//	circle {
//		name        <node name>
//		domain      <circle domain>
//		secret_file <path>               # or: secret {env.VAR} | {file.PATH}
//		data_dir    <dir>
//		listen      <host:port>
//		advertise   <host:port>
//		join        <host:port> [<host:port>...]
//		replicas    <n>
//		relay       <[host]:port>
//		service     <name> <upstream host:port>
//		max_clock_skew <duration>        # default 1m
//	}
//
// Every subdirective takes its arguments on one line; `join` and `service`
// may repeat (each service name once).
// Unknown subdirectives are errors. `secret` accepts only a placeholder, so
// that the secret never appears in the adapted JSON.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume option name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		sub := d.Val()
		if sub != "join" && sub != "service" {
			if seen[sub] {
				return d.Errf("%s specified more than once", sub)
			}
			seen[sub] = true
		}
		switch sub {
		case "name", "domain", "secret_file", "data_dir", "listen", "advertise", "relay":
			if !d.NextArg() {
				return d.ArgErr()
			}
			val := d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
			switch sub {
			case "name":
				a.Name = val
			case "domain":
				a.DomainName = val
			case "secret_file":
				a.SecretFile = val
			case "data_dir":
				a.DataDir = val
			case "listen":
				a.Listen = val
			case "advertise":
				a.Advertise = val
			case "relay":
				a.Relay = val
			}
		case "secret":
			if !d.NextArg() {
				return d.ArgErr()
			}
			val := d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
			if !isPlaceholder(val) {
				// never echo the value: it may be the secret itself
				return d.Err("secret must be an {env.*} or {file.*} placeholder (put a literal secret in secret_file)")
			}
			a.Secret = val
		case "join":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			a.Join = append(a.Join, args...)
		case "service":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("service takes a name and an upstream: service <name> <host:port>")
			}
			name, up := args[0], args[1]
			if !circlenode.ValidServiceName(name) {
				return d.Errf("service name %q: use 1 to 63 of a-z, 0-9 and '-'", name)
			}
			if err := circlenode.ValidateUpstream(up); err != nil {
				return d.Errf("service %s upstream %q: %v", name, up, err)
			}
			if _, dup := a.Services[name]; dup {
				return d.Errf("service %s specified more than once", name)
			}
			if a.Services == nil {
				a.Services = map[string]string{}
			}
			a.Services[name] = up
		case "replicas":
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 1 {
				return d.Errf("replicas must be a positive integer, got %q", d.Val())
			}
			a.Replicas = n
			if d.NextArg() {
				return d.ArgErr()
			}
		case "max_clock_skew":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur <= 0 {
				return d.Errf("max_clock_skew must be a positive duration, got %q", d.Val())
			}
			a.MaxClockSkew = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective %q", sub)
		}
	}
	if a.SecretFile != "" && a.Secret != "" {
		return d.Err("use either secret_file or secret, not both")
	}
	return nil
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens. Syntax:
//
//	storage circle
//
// It takes no arguments and no block: everything comes from the `circle`
// global option.
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume module name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		return d.Errf("unrecognized subdirective %q", d.Val())
	}
	return nil
}

// parseHandlerModule returns a directive func that unmarshals the handler
// module id from the directive's tokens, so the directives are registered
// here while the handlers own their syntax.
func parseHandlerModule(id string) httpcaddyfile.UnmarshalHandlerFunc {
	return func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		mod, err := caddy.GetModule(id)
		if err != nil {
			return nil, h.Errf("getting module %s: %v", id, err)
		}
		inst := mod.New()
		unm, ok := inst.(caddyfile.Unmarshaler)
		if !ok {
			return nil, h.Errf("module %s is not a Caddyfile unmarshaler", id)
		}
		mh, ok := inst.(caddyhttp.MiddlewareHandler)
		if !ok {
			return nil, h.Errf("module %s is not an HTTP middleware handler", id)
		}
		if err := unm.UnmarshalCaddyfile(h.Dispenser); err != nil {
			return nil, err
		}
		return mh, nil
	}
}

// Interface guards
var (
	_ caddyfile.Unmarshaler             = (*App)(nil)
	_ caddyfile.Unmarshaler             = (*Storage)(nil)
	_ httpcaddyfile.UnmarshalGlobalFunc = parseGlobalCircle
)
