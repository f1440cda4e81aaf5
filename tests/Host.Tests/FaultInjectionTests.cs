using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Xunit;
using Xunit.Abstractions;
using static ActorVmm.Host.Vm.VmProtocol;

namespace ActorVmm.Host.Tests;

/// <summary>
/// Stalling a vcpu and failing a nested page fault in a running VM (real VM, vmspace with real
/// userfaultfd, device and vcpu actors; scripted vcpus in place of KVM, a host thread in place of
/// a guest's memory access).
/// </summary>
public sealed class FaultInjectionTests : ScriptedVmTestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    public FaultInjectionTests(ITestOutputHelper output) : base(output)
    {
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "memset")]
    private static extern nint Memset(nint destination, int value, nuint length);

    [Fact]
    public async Task A_stalled_vcpu_holds_up_the_ept_barrier_until_it_acks_and_then_runs_on()
    {
        var rig = Vms.Start(cpus: 2);
        var vmspace = await this.ActorAsync(rig.Vm, "vmspace");

        // Resolved first: resolving kicks the vcpu out of the guest too, which must not pass for the stall.
        var vcpu = await this.ActorAsync(rig.Vm, "vcpu-0");
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest(), "the vcpu goes back into the guest after it was resolved");
        // Its thread stopping (StallStarted) means the stall's kick got it out of the guest.
        var (started, stall) = await ActorVmm.Testing.VmFaults.StallStartedAsync(Sys, vcpu, TimeSpan.FromMilliseconds(600), "test");
        vmspace.Tell(new VmspaceProtocol.SyncEpt(1));

        // The change completes only after the stalled vcpu woke and acked. (Measured from when its
        // thread stopped, not with a quiet window on this thread, which a loaded host overran.)
        Assert.Equal(1, (await ExpectMsgAsync<VmspaceProtocol.EptSynced>(Wait)).Id);
        var since = System.Diagnostics.Stopwatch.GetElapsedTime(started.Timestamp);
        Assert.True(since >= started.Duration, $"the change completed {since.TotalMilliseconds:0} ms into a {started.Duration.TotalMilliseconds:0} ms stall");
        Assert.Equal("vcpu 0 stalled for 600 ms", await stall);
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest(), "the vcpu goes back into the guest after its stall");
        var registers = await (await this.ActorAsync(rig.Vm, "vcpu-0")).Ask<VcpuProtocol.Registers>(VcpuProtocol.GetRegisters.Instance, Wait);
        Assert.Equal(VcpuProtocol.State.Running, registers.State);
    }

    [Fact]
    public async Task A_stalled_device_answers_a_read_after_the_stall()
    {
        var rig = Vms.Start();
        var uart = await this.ActorAsync(rig.Vm, "uart0");
        var (_, stall) = await ActorVmm.Testing.VmFaults.StallStartedAsync(Sys, uart, TimeSpan.FromMilliseconds(300), "test");
        // The guest reads the line status register while the UART is stalled.
        rig.Vcpus[0].Supply(new LibVmm.VmExit.Io(false, (ushort)(Platform.Com1Port + 5), 1, 1, 0, null));
        Assert.Equal("uart0 stalled for 300 ms", await stall);
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest(), "the read was answered");
        Assert.Equal([(0, 0x60UL)], rig.Vcpus[0].IoInCompletions); // LSR: THR empty, transmitter empty
    }

    [Fact]
    public async Task A_failed_nested_page_fault_stops_the_vm_with_a_report_naming_the_fault()
    {
        var rig = Vms.Start(1, VmspaceOptions.Paged());
        Assert.Equal("the next 1 nested page fault(s) will fail", await this.FailNestedPageFaultsAsync(rig.Vm, 1, null, "disk gone"));

        var ram = rig.Memory.Segments[0];
        var page = ram.Backing.GuestView + (nint)ram.BackingOffset + 0x6000;
        var toucher = new Thread(() => Memset(page, 0x5A, 1));
        toucher.Start();
        Assert.True(toucher.Join(Wait), "the faulting access must be woken, not left hanging");

        var outcome = await rig.Ended.WaitAsync(Wait);
        Assert.Equal(OutcomeKind.VcpuError, outcome.Kind);
        Assert.Equal(Outcome.VcpuErrorCode, outcome.ExitCode);
        Assert.Matches(@"^the vmspace failed: Missing fault at gpa 0x6000 \(write\) failed: injected fault: disk gone$", outcome.Detail);
    }

    [Fact]
    public async Task Page_fault_failure_is_refused_by_a_vm_without_demand_paging()
    {
        var rig = Vms.Start();
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => this.FailNestedPageFaultsAsync(rig.Vm, 1, null, "t"));
        Assert.Equal("this vmspace takes no nested page faults (demand paging is off)", e.Message);
        Assert.False(rig.Ended.IsCompleted);
    }
}
