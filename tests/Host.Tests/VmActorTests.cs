using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using ActorVmm.Vcpu.Tests;
using Xunit;
using Xunit.Abstractions;
using static ActorVmm.Host.Vm.VmProtocol;

namespace ActorVmm.Host.Tests;

/// <summary>
/// The VM actor with its real children (vmspace over real memfd memory, device actors, vcpu
/// actors on pinned threads) and scripted vcpus in place of KVM: how a VM ends, and how it
/// survives (or does not survive) failures of its actors.
/// </summary>
public sealed class VmActorTests : ScriptedVmTestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    public VmActorTests(ITestOutputHelper output) : base(output)
    {
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "memset")]
    private static extern nint Memset(nint destination, int value, nuint length);

    private ScriptedVm Start(int cpus = 1, params DeviceSpec[] extra) => Vms.Start(cpus, extra: extra);

    private ScriptedVm Start(int cpus, VmspaceOptions? paging, params DeviceSpec[] extra) => Vms.Start(cpus, paging, extra);

    private static VmExit.Io Out(ushort port, ulong value) => new(true, port, 1, 1, value, null);

    private static async Task<Outcome> Ends(ScriptedVm rig)
    {
        var done = await Task.WhenAny(rig.Ended, Task.Delay(Wait));
        Assert.True(done == rig.Ended, "the VM did not end");
        return await rig.Ended;
    }


    [Fact]
    public async Task Vm_must_end_with_code_0_when_the_boot_vcpu_halts_with_interrupts_disabled()
    {
        var rig = Start(cpus: 2);
        rig.Vcpus[0].InterruptsEnabled = false;
        rig.Vcpus[0].Supply(VmExit.Hlt.Instance);
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.Halted, outcome.Kind);
        Assert.Equal(0, outcome.ExitCode);
        Assert.Equal(0, rig.Vcpus[1].Runs); // an AP never runs before a SIPI
    }

    [Fact]
    public async Task Vm_must_not_lose_output_the_guest_wrote_before_it_halted()
    {
        // A slow console (1 ms a byte): when the guest halts, most of its bytes still wait in the
        // device's mailbox. The VM ends only after its devices handled what was sent to them.
        var written = new System.Collections.Concurrent.ConcurrentQueue<byte>();
        var rig = Start(1, new DeviceSpec("slow-console", DeviceProtocol.Space.Port, 0x2F8, 1, _ => new SlowConsole(written)));
        rig.Vcpus[0].InterruptsEnabled = false;
        var text = string.Concat(Enumerable.Repeat("0123456789", 20));
        rig.Vcpus[0].Supply([.. text.Select(c => (VmExit)Out(0x2F8, c)), VmExit.Hlt.Instance]);

        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.Halted, outcome.Kind);
        Assert.Equal(text, System.Text.Encoding.ASCII.GetString(written.ToArray())); // every byte, when the VM has ended
    }

    private sealed class SlowConsole(System.Collections.Concurrent.ConcurrentQueue<byte> written) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;

        public void Write(ulong offset, int size, ulong value)
        {
            Thread.Sleep(1);
            written.Enqueue((byte)value);
        }
    }

    [Fact]
    public async Task Vm_must_end_with_the_debug_exit_status_even_when_the_guest_halts_right_after()
    {
        var rig = Start();
        rig.Vcpus[0].InterruptsEnabled = false;
        rig.Vcpus[0].Supply(Out(Platform.DebugExitPort, 2), VmExit.Hlt.Instance);
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.DebugExit, outcome.Kind);
        Assert.Equal(5, outcome.ExitCode);
        Assert.Equal(1, rig.Vcpus[0].Pending); // the HLT after the exit write never ran
    }

    [Fact]
    public async Task Vm_must_end_as_a_power_off_with_code_0_when_the_guest_enters_s5_and_run_nothing_after()
    {
        var rig = Start(1, [.. PcPlatform.ResetAndPowerManagement()]);
        rig.Vcpus[0].InterruptsEnabled = false;
        const ushort s5 = AcpiPm.SleepEnable | (AcpiPm.SleepTypeS5 << AcpiPm.SleepTypeShift);
        rig.Vcpus[0].Supply(new VmExit.Io(true, Platform.AcpiPm1ControlBlock, 2, 1, s5, null), VmExit.Hlt.Instance);
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.PowerOff, outcome.Kind);
        Assert.Equal(Outcome.PowerOffCode, outcome.ExitCode);
        Assert.Equal(0, outcome.ExitCode);
        Assert.Contains("S5", outcome.Detail);
        Assert.Equal(1, rig.Vcpus[0].Pending); // the HLT after the write never ran
    }

    [Theory]
    [InlineData(Platform.ResetControlPort, 0x06)]
    [InlineData(Platform.SystemControlPortA, 0x01)]
    public async Task Vm_must_end_as_a_reset_when_the_guest_writes_a_reset_port(ushort port, byte value)
    {
        var rig = Start(1, [.. PcPlatform.ResetAndPowerManagement()]);
        rig.Vcpus[0].InterruptsEnabled = false;
        rig.Vcpus[0].Supply(Out(port, value), VmExit.Hlt.Instance);
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.Reset, outcome.Kind);
        Assert.Equal(Outcome.ResetCode, outcome.ExitCode);
        Assert.Equal(1, rig.Vcpus[0].Pending);
    }

    [Fact]
    public async Task Vm_must_end_with_the_debug_exit_status_and_stop_every_vcpu()
    {
        var rig = Start();
        rig.Vcpus[0].Supply(Out(0x3F8, 'h'), Out(0x3F8, 'i'), Out(Platform.DebugExitPort, 3));
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.DebugExit, outcome.Kind);
        Assert.Equal(7, outcome.ExitCode);
        Assert.Equal("hi", rig.Console.CapturedText());
        rig.Vm.Tell(GetStatus.Instance);
        Assert.Equal(Phase.Ended, (await ExpectMsgAsync<VmProtocol.Status>()).Phase);
    }

    [Fact]
    public async Task Vm_must_stop_with_a_report_naming_a_vcpu_whose_actor_crashed()
    {
        var rig = Start();
        var vcpu = await Sys.ActorSelection(rig.Vm.Path / "vcpu-0").ResolveOne(Wait);
        vcpu.Tell(new FaultProtocol.Crash("test"));
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.VcpuError, outcome.Kind);
        Assert.Equal(Outcome.VcpuErrorCode, outcome.ExitCode);
        Assert.Contains("vcpu-0", outcome.Detail);
        Assert.Contains("injected fault: test", outcome.Detail);
    }

    [Fact]
    public async Task Vm_must_survive_a_uart_crash_and_keep_its_fifo_and_every_output_byte()
    {
        var rig = Start();
        var uart = await Sys.ActorSelection(rig.Vm.Path / "uart0").ResolveOne(Wait);
        uart.Tell(new DeviceProtocol.Write(2, 1, 0x01), ActorRefs.NoSender); // FCR: enable FIFOs
        uart.Tell(new DeviceProtocol.HostInput("abc"u8.ToArray()), ActorRefs.NoSender);
        rig.Vcpus[0].Supply(Out(0x3F8, '1'), Out(0x3F8, '2'));
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest());

        uart.Tell(new FaultProtocol.Crash("in the middle of output"));
        rig.Vcpus[0].Supply(Out(0x3F8, '3'));
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest());

        // The received bytes survived the restart, in order.
        foreach (var expected in "abc")
        {
            uart.Tell(new DeviceProtocol.Read(1, 0, 1));
            Assert.Equal(new DeviceProtocol.ReadResult(1, expected), await ExpectMsgAsync<DeviceProtocol.ReadResult>());
        }
        uart.Tell(DeviceProtocol.GetHealth.Instance);
        Assert.Equal(new DeviceProtocol.Health("uart0", 1, 1), await ExpectMsgAsync<DeviceProtocol.Health>());
        Assert.True(rig.Vcpus[0].WaitUntil(_ => rig.Console.CapturedText() == "123"), rig.Console.CapturedText());
        Assert.False(rig.Ended.IsCompleted);
    }

    [Fact]
    public async Task Vm_must_end_when_a_device_keeps_failing()
    {
        var rig = Start();
        var uart = await Sys.ActorSelection(rig.Vm.Path / "uart0").ResolveOne(Wait);
        for (var i = 0; i <= VmActor.MaxDeviceRestarts; i++) uart.Tell(new FaultProtocol.Crash($"crash {i}"));
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.VcpuError, outcome.Kind);
        Assert.Contains("uart0", outcome.Detail);
    }

    [Fact]
    public async Task Vm_must_stop_on_request_with_code_130_even_while_a_vcpu_waits_for_a_device()
    {
        using var slow = new SlowDevice();
        var rig = Start(1, new DeviceSpec("slow", DeviceProtocol.Space.Port, 0x10, 1, _ => slow));
        rig.Vcpus[0].Supply(new VmExit.Io(false, 0x10, 1, 1, 0, null));
        Assert.True(slow.Entered.Wait(Wait), "the read never reached the device");
        rig.Vm.Tell(new VmProtocol.Stop("test stop"));
        var outcome = await Ends(rig);
        Assert.Equal(OutcomeKind.Stopped, outcome.Kind);
        Assert.Equal(Outcome.StoppedCode, outcome.ExitCode);
        Assert.Contains("test stop", outcome.Detail);
    }

    [Fact]
    public async Task The_ept_barrier_completes_only_after_every_vcpu_left_the_guest_and_acked()
    {
        var rig = Start(cpus: 2);
        var vmspace = await Sys.ActorSelection(rig.Vm.Path / "vmspace").ResolveOne(Wait);
        var kicks = rig.Vcpus[0].Kicks;

        // vcpu 0 spins in the guest (a blocked scripted Run); vcpu 1 was never started (an AP).
        vmspace.Tell(new VmspaceProtocol.SyncEpt(7));
        var synced = await ExpectMsgAsync<VmspaceProtocol.EptSynced>(Wait);
        Assert.Equal(7, synced.Id);
        Assert.True(synced.Generation > 0);
        Assert.True(rig.Vcpus[0].Kicks > kicks, "the running vcpu must be kicked out of the guest to ack");
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest(), "the vcpu goes back into the guest after acking");

        // Paused vcpus ack at once too.
        rig.Vm.Tell(VmProtocol.Pause.Instance);
        vmspace.Tell(new VmspaceProtocol.SyncEpt(8));
        Assert.Equal(8, (await ExpectMsgAsync<VmspaceProtocol.EptSynced>(Wait)).Id);
    }

    [Fact]
    public async Task With_demand_paging_a_first_touch_of_guest_ram_is_a_nested_page_fault_the_vmspace_resolves()
    {
        var rig = Start(1, VmspaceOptions.Paged());
        var vmspace = await Sys.ActorSelection(rig.Vm.Path / "vmspace").ResolveOne(Wait);
        var before = (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Wait)).Paging;
        Assert.True(before.Enabled, before.Features);

        // A thread stands in for the vcpu's memory access (through libc: it blocks in the kernel
        // until the vmspace resolves the fault, as a vcpu inside KVM_RUN would).
        var ram = rig.Memory.Segments[0];
        var page = ram.Backing.GuestView + (nint)ram.BackingOffset + 0x5000;
        var toucher = new Thread(() => Memset(page, 0x5A, 1));
        toucher.Start();
        Assert.True(toucher.Join(Wait), "the fault was not resolved");

        var after = (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Wait)).Paging;
        Assert.Equal(before.MissingFaults + 1, after.MissingFaults);
        var data = new byte[1];
        rig.Memory.Read(new GuestPhysAddr(0x5000), data);
        Assert.Equal(0x5A, data[0]);
        rig.Vm.Tell(new VmProtocol.Stop("done"));
        await Ends(rig);
    }

    [Fact]
    public async Task Vm_must_pause_every_vcpu_out_of_the_guest_and_resume_them()
    {
        var rig = Start();
        rig.Vm.Tell(VmProtocol.Pause.Instance);
        rig.Vm.Tell(GetStatus.Instance);
        Assert.Equal(Phase.Paused, (await ExpectMsgAsync<VmProtocol.Status>()).Phase);
        var vcpu = await Sys.ActorSelection(rig.Vm.Path / "vcpu-0").ResolveOne(Wait);
        vcpu.Tell(VcpuProtocol.GetStats.Instance);
        Assert.Equal(VcpuProtocol.State.Paused, (await ExpectMsgAsync<VcpuProtocol.Stats>()).State);
        rig.Vm.Tell(VmProtocol.Resume.Instance);
        rig.Vcpus[0].Supply(Out(Platform.DebugExitPort, 0));
        Assert.Equal(1, (await Ends(rig)).ExitCode);
    }

    /// <summary>A device whose read does not answer until the test is over (at most 10 s).</summary>
    private sealed class SlowDevice : IBusDevice, IDisposable
    {
        private readonly ManualResetEventSlim _release = new();
        public readonly ManualResetEventSlim Entered = new();

        public ulong Read(ulong offset, int size)
        {
            Entered.Set();
            _release.Wait(Wait);
            return 0;
        }

        public void Write(ulong offset, int size, ulong value) { }

        public void Dispose() => _release.Set();
    }
}
