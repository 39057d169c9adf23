// A vSphere API simulator for the labs' ESXi path (appliance/lab/esxi.py): govmomi's simulator with an ESXi
// model (one standalone host), serving HTTPS on loopback. Prints its URL, runs until SIGTERM or SIGINT.
//
// Two things the simulator does not do by itself, added here:
//   - every SOAP request is traced to the file named by $VCSIM_TRACE (the test reads which calls came, in order);
//   - VMware Tools: a powered-on VM's guest heartbeat turns green shortly after power-on, as a guest whose
//     tools start does, except for VMs whose name ends in "-notools" (a guest that never boots).
//
// Run from the directory where NAS datastores' local paths should exist.
package main

import (
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func tools(stop <-chan struct{}) {
	seen := map[types.ManagedObjectReference]time.Time{}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		for _, e := range simulator.Map.All("VirtualMachine") {
			vm, ok := e.(*simulator.VirtualMachine)
			if !ok {
				continue
			}
			simulator.Map.WithLock(vm, func() {
				on := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
				if !on {
					delete(seen, vm.Self)
					vm.GuestHeartbeatStatus = types.ManagedEntityStatusGray
					vm.Summary.QuickStats.GuestHeartbeatStatus = types.ManagedEntityStatusGray
					return
				}
				if _, ok := seen[vm.Self]; !ok {
					seen[vm.Self] = time.Now()
				}
				if strings.HasSuffix(vm.Name, "-notools") || time.Since(seen[vm.Self]) < 500*time.Millisecond {
					return
				}
				vm.GuestHeartbeatStatus = types.ManagedEntityStatusGreen
				vm.Summary.QuickStats.GuestHeartbeatStatus = types.ManagedEntityStatusGreen
				if vm.Guest != nil {
					vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
				}
			})
		}
	}
}

func main() {
	if path := os.Getenv("VCSIM_TRACE"); path != "" {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vcsim:", err)
			os.Exit(1)
		}
		defer f.Close()
		simulator.Trace, simulator.TraceFile = true, f
	}
	model := simulator.ESX()
	model.Machine = 0 // no VMs but the labs'
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		os.Exit(1)
	}
	defer model.Remove()
	model.Service.TLS = new(tls.Config)
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword("bootback", "vcsim-pass")}
	server := model.Service.NewServer()
	defer server.Close()
	done := make(chan struct{})
	go tools(done)
	fmt.Println(server.URL.String())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	close(done)
}
