// Command caddy is Caddy with the standard modules and the Circle modules,
// as xcaddy would build it.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/homecircle/circle/caddymodule"
)

func main() {
	caddycmd.Main()
}
