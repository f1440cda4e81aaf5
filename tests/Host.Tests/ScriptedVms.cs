using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu.Tests;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>A running VM as the KVM-free tests see it: the real VM actor with its vmspace (real
/// memfd memory), device, vlapic and vcpu actors, and scripted vcpus in place of KVM.</summary>
internal sealed record ScriptedVm(IActorRef Vm, Task<VmProtocol.Outcome> Ended, IReadOnlyList<ScriptedVcpu> Vcpus,
    SerialConsole Console, GuestMemoryMap Memory);

/// <summary>
/// Starts scripted VMs for one test class and tears them down in the order shutdown needs:
/// <see cref="ReleaseVcpus"/> before the actor system stops (a blocked scripted Run would hold it
/// up), <see cref="Dispose"/> after it (memory may not go while the vmspace still runs).
/// </summary>
internal sealed class ScriptedVms(ActorSystem system) : IDisposable
{
    private readonly List<ScriptedVcpu> _vcpus = [];
    private readonly List<IDisposable> _after = [];

    /// <param name="interruptPlatform">the PC interrupt controllers and timers (IOAPIC, PIC, PIT, RTC) too</param>
    /// <param name="trace">records the VM's messages (its actors get traced mailboxes)</param>
    /// <param name="faults">link faults applied in the VM's mailboxes</param>
    public ScriptedVm Start(int cpus = 1, VmspaceOptions? paging = null, IEnumerable<DeviceSpec>? extra = null,
        bool interruptPlatform = false, ITraceSink? trace = null, LinkFaultPlan? faults = null, LapicBackendFactory? lapic = null)
    {
        var name = $"vm-{Guid.NewGuid():N}";
        if (trace is not null) _after.Add(MessageTraceRegistry.Register(system, $"/user/{name}", trace));
        if (faults is not null) _after.Add(LinkFaultRegistry.Register(system, $"/user/{name}", faults));
        var memory = VmspaceLayout.Build(4 << 20);
        var console = SerialConsole.Captured();
        _after.Add(console);
        var vcpus = Enumerable.Range(0, cpus).Select(i => new ScriptedVcpu(i)).ToList();
        _vcpus.AddRange(vcpus);

        var devices = new List<DeviceSpec>
        {
            interruptPlatform
                ? PcPlatform.Com1(console.Write)
                : new("uart0", DeviceProtocol.Space.Port, Platform.Com1Port, Platform.Com1Length,
                    _ => new Uart16550(NullInterruptLine.Instance, console.Write),
                    (_, state) => Uart16550.FromState((UartState)state, NullInterruptLine.Instance, console.Write)),
            PcPlatform.DebugExit(),
        };
        if (interruptPlatform) devices.AddRange(PcPlatform.InterruptControllersAndTimers(cpus, biosLikePic: true));
        if (extra is not null) devices.AddRange(extra);

        var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
        var resources = new VmResources("test", memory, vcpus, devices, Traced: trace is not null,
            interruptPlatform ? new MonotonicClock() : null, lapic, paging, FaultInjection: faults is not null);
        var props = Props.Create(() => new VmActor(resources, ended));
        if (trace is not null || faults is not null) props = props.WithMailbox(TracedMailboxType.Id);
        var vm = system.ActorOf(props, name);
        _after.Add(memory); // after the console and registrations: the VM is gone by then
        vm.Tell(VmProtocol.Start.Instance);
        Assert.True(vcpus[0].WaitUntilIdleInGuest(), "vcpu 0 did not start");
        return new ScriptedVm(vm, ended.Task, vcpus, console, memory);
    }

    public void ReleaseVcpus()
    {
        foreach (var v in _vcpus) v.Dispose();
    }

    public void Dispose()
    {
        ReleaseVcpus();
        foreach (var d in _after) d.Dispose();
    }
}

/// <summary>A TestKit whose actor system runs scripted VMs: the vcpu and traced mailbox
/// configuration, <see cref="Vms"/>, and teardown in the order shutdown needs.</summary>
public abstract class ScriptedVmTestKit : Akka.TestKit.Xunit2.TestKit
{
    private protected ScriptedVms Vms { get; }

    protected ScriptedVmTestKit(Xunit.Abstractions.ITestOutputHelper output)
        : base(Akka.Configuration.ConfigurationFactory.ParseString(ActorVmm.Vcpu.VcpuProtocol.DefaultConfig)
            .WithFallback(Akka.Configuration.ConfigurationFactory.ParseString(TracedMailboxType.DefaultConfig)), output: output)
    {
        Vms = new ScriptedVms(Sys);
    }

    protected override void Dispose(bool disposing)
    {
        Vms.ReleaseVcpus();
        base.Dispose(disposing);
        Vms.Dispose();
    }
}
