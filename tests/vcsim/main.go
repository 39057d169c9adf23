// A vSphere API simulator for the tests of the ESXi datastore role: govmomi's simulator with a vCenter
// model (one standalone host, one cluster of hosts), serving HTTPS on loopback. Prints its URL, runs until
// SIGTERM or SIGINT. Run from the directory where NAS datastores' local paths should exist.
package main

import (
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	model := simulator.VPX()
	model.ClusterHost = 2
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		os.Exit(1)
	}
	defer model.Remove()
	model.Service.TLS = new(tls.Config)
	// A login of its own: the default one accepts any password.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword("bootback", "vcsim-pass")}
	server := model.Service.NewServer()
	defer server.Close()
	fmt.Println(server.URL.String())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
