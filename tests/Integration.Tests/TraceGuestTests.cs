using ActorVmm.Devices;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Xunit;

namespace ActorVmm.Integration.Tests;

/// <summary>The causal trace of a real guest: every hop of an interrupt names its cause.</summary>
public sealed class TraceGuestTests
{
    [KvmFact]
    public async Task The_demo_guests_uart_interrupt_is_traced_from_the_vcpu_exit_to_its_acceptance_by_parent_ids()
    {
        await using var run = await GuestRun.RunAsync(DemoGuest.Build());
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(DemoGuest.Greeting + DemoGuest.AfterInterrupt, run.Serial);

        var events = run.Trace.Snapshot();
        var byId = events.ToDictionary(e => e.Id);
        TraceEvent Parent(TraceEvent e)
        {
            Assert.True(e.ParentId != 0, $"#{e.Id} {e.Sender} -> {e.Receiver} {e.Type} has no parent");
            Assert.True(byId.TryGetValue(e.ParentId, out var p), $"#{e.Id}'s parent #{e.ParentId} is not in the trace");
            return p!;
        }

        var accepted = Assert.Single(events, e => e.Message is VlapicProtocol.InterruptAccepted { Vector: DemoGuest.UartVector });
        Assert.Equal(("vcpu-0", "vlapic-0"), (accepted.Sender, accepted.Receiver));

        var pending = Parent(accepted);
        Assert.Equal(("vlapic-0", "vcpu-0"), (pending.Sender, pending.Receiver));
        Assert.Equal(DemoGuest.UartVector, Assert.IsType<VlapicProtocol.InterruptPending>(pending.Message).Vector);

        var deliver = Parent(pending);
        Assert.Equal(("apic-router", "vlapic-0"), (deliver.Sender, deliver.Receiver));
        Assert.Equal(DemoGuest.UartVector, Assert.IsType<VlapicProtocol.DeliverInterrupt>(deliver.Message).Vector);

        var apicMessage = Parent(deliver);
        Assert.Equal(("ioapic", "apic-router"), (apicMessage.Sender, apicMessage.Receiver));
        Assert.Equal(DemoGuest.UartVector, Assert.IsType<ApicMessage>(apicMessage.Message).Vector);

        var irq = Parent(apicMessage);
        Assert.Equal(("uart0", "ioapic"), (irq.Sender, irq.Receiver));
        Assert.Equal(new DeviceProtocol.SetIrqLevel(4, true), irq.Message);

        var ierWrite = Parent(irq);
        Assert.Equal(("vcpu-0", "uart0"), (ierWrite.Sender, ierWrite.Receiver));
        Assert.Equal(new DeviceProtocol.Write(1, 1, 0x02), ierWrite.Message); // IER.ETBEI

        var exit = Parent(ierWrite);
        Assert.Equal(("vcpu-0", "vcpu-0"), (exit.Sender, exit.Receiver));
        var guestExit = Assert.IsType<VcpuProtocol.GuestExit>(exit.Message);
        Assert.Equal((0x3F9UL, true), (guestExit.Address, guestExit.Write));

        // Time runs forward along the chain.
        TraceEvent[] chain = [exit, ierWrite, irq, apicMessage, deliver, pending, accepted];
        Assert.True(chain.Zip(chain.Skip(1)).All(p => p.First.Nanoseconds <= p.Second.Nanoseconds));
    }
}
