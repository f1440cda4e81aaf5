using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using ActorVmm.Vcpu.Tests;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// `actorvmm ctl` against a host: two actor systems in this process talking over remoting on
/// 127.0.0.1 (port 0), the host running a real VM actor whose vcpus are scripted (no KVM here),
/// and the real `actorvmm ctl` executable as a client process.
/// </summary>
public sealed class ControlTests : IAsyncLifetime
{
    private ActorSystem _host = null!;
    private GuestMemoryMap _memory = null!;
    private ScriptedVcpu _vcpu = null!;
    private ControlClient _client = null!;
    private IActorRef _vm = null!;
    private string _address = "";

    public async Task InitializeAsync()
    {
        _host = HostRunner.CreateSystem(VmConfig.Load(null), ControlClient.HostSystemName, control: true);
        _address = HostRunner.ControlAddress(_host);
        _memory = VmspaceLayout.Build(16 << 20);
        _vcpu = new ScriptedVcpu(0);
        var console = SerialConsole.Captured();
        var devices = new List<DeviceSpec>
        {
            new("uart0", DeviceProtocol.Space.Port, Platform.Com1Port, Platform.Com1Length, _ => new Uart16550(NullInterruptLine.Instance, console.Write)),
        };
        var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
        var resources = new VmResources("guest1", _memory, [_vcpu], devices, Traced: false, Lapic: LapicBackends.Emulated(null));
        _vm = _host.ActorOf(Props.Create(() => new VmActor(resources, ended)), "vm-guest1");
        _host.ActorSelection("/user/vmm").Tell(new ControlProtocol.Register("guest1", _vm, ActorRefs.Nobody));
        _vm.Tell(VmProtocol.Start.Instance);
        Assert.True(_vcpu.WaitUntilIdleInGuest());
        _client = ControlClient.Create(TimeSpan.FromSeconds(5));
        await Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _client.DisposeAsync();
        _vm.Tell(new VmProtocol.Stop("test over"));
        _vcpu.Dispose();
        await _host.Terminate();
        _memory.Dispose();
    }

    [Fact]
    public async Task Ctl_lists_the_vms_of_a_host()
    {
        var list = await _client.ListAsync(_address);
        Assert.Equal(_address, list.Host);
        Assert.Equal(["guest1"], list.Vms.Select(v => v.Name));
        var status = await _client.StatusAsync(list.Vms[0].Actor);
        Assert.Equal(VmProtocol.Phase.Running, status.Phase);
        Assert.Equal(1, status.Vcpus);
    }

    [Fact]
    public async Task Ctl_names_what_does_not_exist()
    {
        var e = await Assert.ThrowsAsync<ControlException>(() => _client.FindVmAsync("nope", [_address]));
        Assert.Equal("no VM named nope (running: guest1)", e.Message);
        var unreachable = await Assert.ThrowsAsync<ControlException>(() => _client.ListAsync("127.0.0.1:1"));
        Assert.Contains("does not answer", unreachable.Message);
    }

    [Fact]
    public async Task Ctl_regs_of_a_paused_vm_shows_the_rip_and_the_code_there_through_the_guest_page_tables()
    {
        // A 64-bit guest state: the loader's page tables and GDT in guest memory, code at 1 MiB.
        var code = new byte[] { 0x48, 0xFF, 0xC0, 0xF4 }; // inc rax; hlt
        var boot = new LongModeImage(code, 0x10_0000, 0x10_0003).Load(_memory);
        var vm = await _client.FindVmAsync("guest1", [_address]);
        Assert.Equal(VmProtocol.Phase.Paused, (await _client.PauseAsync(vm)).Phase);
        var vcpu = await _host.ActorSelection(_vm.Path / "vcpu-0").ResolveOne(TimeSpan.FromSeconds(5));
        var special = boot.Special!(SpecialRegisterState.From(_vcpu.GetSpecialRegisters()));
        await vcpu.Ask<VcpuProtocol.RegistersSet>(new VcpuProtocol.SetRegisters(boot.Registers! with { Rax = 0x1234 }, special), TimeSpan.FromSeconds(5));

        var (regs, bytes, linear) = await _client.RegistersAsync(vm, 0);
        Assert.Equal(0x10_0003UL, regs.General.Rip);
        Assert.Equal(VcpuProtocol.State.Paused, regs.State);
        Assert.Equal(0x10_0003UL, linear);
        Assert.Equal(0xF4, bytes[0]);
        var text = RegisterDump.Format(regs, bytes, linear);
        Assert.Contains("RIP=0000000000100003", text);
        Assert.Contains("RAX=0000000000001234", text);
        Assert.Contains("(64-bit)", text);
        Assert.Contains("hlt", text);

        Assert.Equal(VmProtocol.Phase.Running, (await _client.ResumeAsync(vm)).Phase);
    }

    [Fact]
    public async Task Ctl_regs_shows_the_local_apic_state_the_guest_programmed()
    {
        // The guest raises its TPR and programs a periodic timer through the xAPIC page.
        _vcpu.Supply(
            new VmExit.Mmio(Platform.LocalApicBase + 0x80, true, 4, 0x30),
            new VmExit.Mmio(Platform.LocalApicBase + 0xF0, true, 4, 0x1FF),
            new VmExit.Mmio(Platform.LocalApicBase + 0x320, true, 4, (1u << 17) | (1u << 16) | 0xEC));
        Assert.True(_vcpu.WaitUntilIdleInGuest());
        var vm = await _client.FindVmAsync("guest1", [_address]);

        var text = await _client.LapicAsync(vm, 0);

        Assert.NotNull(text);
        Assert.Contains("local APIC of vcpu 0: XApic, id 0, software-enabled", text);
        Assert.Contains("TPR=30 PPR=30", text);
        Assert.Contains("LVT timer   000300EC masked, Periodic, vector EC", text);
        var missing = await Assert.ThrowsAsync<ControlException>(() => _client.RegistersAsync(vm, 7));
        Assert.Equal("vm-guest1 has no vcpu-7", missing.Message);
    }

    [Fact]
    public async Task Ctl_stats_and_stop()
    {
        _vcpu.Supply(new VmExit.Io(true, 0x3F8, 1, 1, 'x', null), new VmExit.Io(false, 0x2F8, 1, 1, 0, null),
            new VmExit.Mmio(Platform.LocalApicBase + 0xF0, true, 4, 0x1FF),      // SVR: APIC on
            new VmExit.Mmio(Platform.LocalApicBase + 0x300, true, 4, 0x42));     // ICR: fixed 0x42 to APIC 0 (itself), by the router
        Assert.True(_vcpu.WaitUntilIdleInGuest());
        var vm = await _client.FindVmAsync("guest1", [_address]);
        string stats;
        var deadline = DateTime.UtcNow.AddSeconds(10);
        do stats = await _client.StatsAsync(vm); // the IPI goes vlapic -> router -> vlapic after the exit
        while (!stats.Contains("1 interrupts delivered") && DateTime.UtcNow < deadline);
        Assert.Contains("guest1: Running, 1 vcpu(s)", stats);
        Assert.Contains("device uart0: 0 reads, 1 writes", stats);
        Assert.True(stats.Contains("vlapic 0: 1 IPIs sent, 1 interrupts delivered"), stats);
        Assert.Matches(@"\n0\s+Running\s+\d+\s+2\s+2\s", stats); // vcpu 0: two I/O exits, two MMIO exits
        Assert.Matches(@"io-out\s+1\s+handled in µs: ", stats);
        Assert.Matches(@"io-in\s+1\s+handled in µs: ", stats);
        var stopping = await _client.StopAsync(vm);
        Assert.Contains(stopping.Phase, new[] { VmProtocol.Phase.Ending, VmProtocol.Phase.Ended });
        Assert.Equal(VmProtocol.OutcomeKind.Stopped, stopping.Outcome!.Kind);
        Assert.Contains("stopped by ctl", stopping.Outcome.Detail);
    }

    [Fact]
    public async Task Ctl_fault_crashes_a_device_which_restarts_from_its_state_and_the_vm_runs_on()
    {
        var vm = await _client.FindVmAsync("guest1", [_address]);
        var text = await _client.CrashAsync(vm, "uart0", "test");
        Assert.Contains("crashed vm-guest1/uart0; it was restarted from its saved state; the VM is Running", text);
        var stats = await _client.StatsAsync(vm);
        Assert.Contains("restarted after a failure: uart0: InjectedFaultException: injected fault: test", stats);
        var uart = await _host.ActorSelection(_vm.Path / "uart0").ResolveOne(TimeSpan.FromSeconds(5));
        var health = await uart.Ask<DeviceProtocol.Health>(DeviceProtocol.GetHealth.Instance, TimeSpan.FromSeconds(5));
        Assert.Equal(1, health.Restarts);
        Assert.Equal(VmProtocol.Phase.Running, (await _client.StatusAsync(vm)).Phase);
        await Assert.ThrowsAsync<ControlException>(() => _client.CrashAsync(vm, "no-such-device", "test"));
    }

    [Fact]
    public async Task Ctl_mem_reports_the_vmspace()
    {
        var vm = await _client.FindVmAsync("guest1", [_address]);
        var text = await _client.MemoryAsync(vm);
        Assert.Contains("guest memory   16 MiB", text);
        Assert.Contains("demand paging  off", text); // this VM's vmspace runs without userfaultfd
        Assert.Contains("superpages     off: ", text); // its RAM was built without MADV_HUGEPAGE
    }

    [Fact]
    public async Task Ctl_mem_of_a_demand_paged_vm_counts_accessed_and_dirty_pages_from_the_pmap()
    {
        // A second VM whose vmspace pages through userfaultfd. A host thread touching its guest view
        // faults exactly as a vcpu would (and waits in the kernel while the vmspace resolves it).
        using var memory = VmspaceLayout.Build(16 << 20);
        using var vcpu = new ScriptedVcpu(0);
        var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
        var resources = new VmResources("paged", memory, [vcpu], [], Traced: false, Paging: VmspaceOptions.Paged());
        var actor = _host.ActorOf(Props.Create(() => new VmActor(resources, ended)), "vm-paged");
        _host.ActorSelection("/user/vmm").Tell(new ControlProtocol.Register("paged", actor, ActorRefs.Nobody));
        actor.Tell(VmProtocol.Start.Instance);
        Assert.True(vcpu.WaitUntilIdleInGuest()); // started: the vmspace has registered guest RAM
        try
        {
            var ram = memory.Segments[0].Backing;
            await Task.Factory.StartNew(() =>
            {
                GuestView.ReadByte(ram.GuestView + 0x40_0000);         // page A: read    -> accessed
                GuestView.WriteByte(ram.GuestView + 0x40_1000, 7);     // page B: written -> accessed, dirty
            }, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromSeconds(10));
            var vmspace = await _host.ActorSelection(actor.Path / "vmspace").ResolveOne(TimeSpan.FromSeconds(5));
            await vmspace.Ask<VmspaceProtocol.MemoryWritten>(new VmspaceProtocol.WriteMemory(1, 0x40_2000, [1]), TimeSpan.FromSeconds(5)); // page C: a device write -> dirty only

            var vm = await _client.FindVmAsync("paged", [_address]);
            var text = await _client.MemoryAsync(vm);

            Assert.Contains("demand paging  on", text);
            Assert.Contains("pages          4096 RAM, 3 resident, 0 swapped, 0 held", text);
            Assert.Contains("pmap A/D       2 accessed, 2 dirty (since the last clear)", text);
            Assert.Contains("faults         2 missing, 0 minor (accessed), 0 write-protect (dirty)", text);
        }
        finally
        {
            // The vmspace (a child) stops first and unregisters guest RAM; only then is it unmapped.
            actor.Tell(new VmProtocol.Stop("test over"));
            vcpu.Dispose(); // a scripted vcpu returns from its run at once from now on
            Assert.True(await actor.GracefulStop(TimeSpan.FromSeconds(10)));
        }
    }

    [Fact]
    public async Task The_actorvmm_ctl_executable_talks_to_the_host_over_loopback()
    {
        var (code, stdout, stderr) = await Ctl("list", "--host", _address, "--wait", "30");
        Assert.True(code == 0, stderr);
        Assert.Contains("guest1", stdout);
        Assert.Contains("Running", stdout);
        Assert.Contains($"node={_address}", stdout);
    }

    [Fact]
    public async Task Ctl_refuses_a_wait_out_of_range_clearly()
    {
        var (code, stdout, stderr) = await Ctl("stats", "--vm", "guest1", "--host", _address, "--wait", "0");
        Assert.NotEqual(0, code);
        Assert.Equal("", stdout);
        Assert.Contains("--wait takes 0 to 3600 seconds", stderr);
        Assert.DoesNotContain("   at ", stderr);
    }

    [Fact]
    public async Task Ctl_fault_stalls_a_vcpu_and_refuses_what_the_vm_cannot_take()
    {
        var (code, stdout, stderr) = await Ctl("fault", "--vm", "guest1", "--host", _address, "--actor", "vcpu-0", "--stall", "200");
        Assert.True(code == 0, stderr);
        Assert.Equal("vm-guest1/vcpu-0: vcpu 0 stalled for 200 ms", stdout.Trim());
        Assert.True(_vcpu.WaitUntilIdleInGuest(), "the vcpu runs on after its stall");

        var vm = await _client.FindVmAsync("guest1", [_address]);
        var refused = await Assert.ThrowsAsync<ControlException>(() =>
            _client.InjectAsync(vm, "vmspace", new FaultProtocol.FailNestedPageFaults(1, null, "t"), TimeSpan.Zero));
        Assert.Equal("vm-guest1/vmspace: this vmspace takes no nested page faults (demand paging is off)", refused.Message);
        Assert.Equal(VmProtocol.Phase.Running, (await _client.StatusAsync(vm)).Phase);
    }

    /// <summary>Runs the real `actorvmm ctl` executable.</summary>
    private static async Task<(int Code, string Stdout, string Stderr)> Ctl(params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "actorvmm.dll"), "ctl" }.Concat(args)) start.ArgumentList.Add(a);
        using var p = Process.Start(start)!;
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(60));
        return (p.ExitCode, await stdout, await stderr);
    }
}

/// <summary>Touches a guest view from native code (libc memcpy), as a vcpu inside KVM_RUN would: a
/// thread blocked in a userfaultfd fault must not be in managed code (see Userfaultfd).</summary>
internal static unsafe partial class GuestView
{
    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "memcpy")]
    private static partial nint Memcpy(nint destination, nint source, nuint length);

    public static byte ReadByte(nint address)
    {
        byte b;
        Memcpy((nint)(&b), address, 1);
        return b;
    }

    public static void WriteByte(nint address, byte value) => Memcpy(address, (nint)(&value), 1);
}
