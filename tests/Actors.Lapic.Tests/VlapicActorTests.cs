using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;
using static ActorVmm.Lapic.VlapicProtocol;

namespace ActorVmm.Lapic.Tests;

/// <summary>
/// The vlapic actor with probes for its vcpu, the IPI router and the EOI target, on TestKit's
/// virtual scheduler: the APIC timer runs on <see cref="SchedulerClock"/> and fires on Advance.
/// </summary>
public sealed class VlapicActorTests : TestKit
{
    private const string VirtualTime = """akka.scheduler.implementation = "Akka.TestKit.TestScheduler, Akka.TestKit" """;
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    private long _nextId = 1;

    public VlapicActorTests() : base(VirtualTime)
    {
    }

    private TestScheduler Scheduler => (TestScheduler)Sys.Scheduler;

    private sealed record Rig(IActorRef Vlapic, TestProbe Vcpu, TestProbe Router, TestProbe Eoi, TestProbe Bus);

    private Rig Create(int vcpuId = 0, bool enable = true)
    {
        var vcpu = CreateTestProbe($"vcpu{vcpuId}");
        var router = CreateTestProbe($"router{vcpuId}");
        var eoi = CreateTestProbe($"eoi{vcpuId}");
        var bus = CreateTestProbe($"bus{vcpuId}"); // the vcpu's side of the MMIO bus
        var vlapic = Sys.ActorOf(Props(vcpuId, new Wiring(vcpu, router, eoi)), $"vlapic{vcpuId}");
        var rig = new Rig(vlapic, vcpu, router, eoi, bus);
        if (enable) Write(rig, Svr, 0x1FF);
        return rig;
    }

    private static void Write(Rig rig, int offset, uint value) =>
        rig.Vlapic.Tell(new DeviceProtocol.Write((ulong)offset, 4, value), rig.Bus);

    private async Task<uint> ReadAsync(Rig rig, int offset)
    {
        var id = _nextId++;
        rig.Vlapic.Tell(new DeviceProtocol.Read(id, (ulong)offset, 4), rig.Bus);
        var result = await rig.Bus.ExpectMsgAsync<DeviceProtocol.ReadResult>();
        Assert.Equal(id, result.Id);
        return (uint)result.Value;
    }

    [Fact]
    public async Task Vlapic_must_take_back_a_reported_vector_when_a_tpr_write_masks_it_before_the_vcpu_goes_on()
    {
        var rig = Create();
        rig.Vlapic.Tell(new DeliverInterrupt(0x42, true, TriggerMode.Edge, DeliveryMode.Fixed));
        var reported = await rig.Vcpu.ExpectMsgAsync<InterruptPending>();
        Assert.Equal(0x42, reported.Vector);

        // A TPR write the vcpu waits for: the withdrawal and the new TPR reach it before the reply.
        rig.Vlapic.Tell(new DeviceProtocol.WriteAndWait(9, Tpr, 4, 0x50), rig.Bus);
        var withdrawn = await rig.Vcpu.ExpectMsgAsync<NoInterruptPending>();
        Assert.True(withdrawn.Seq > reported.Seq);
        Assert.Equal(new TaskPriorityChanged(0, 0x50), await rig.Vcpu.ExpectMsgAsync<TaskPriorityChanged>());
        Assert.Equal(new DeviceProtocol.WriteDone(9, false), await rig.Bus.ExpectMsgAsync<DeviceProtocol.WriteDone>());

        // CR8 lowered (seen by the vcpu at an exit): reported afresh, and not echoed back as a TPR change.
        rig.Vlapic.Tell(new SetTaskPriority(0), rig.Vcpu);
        var again = await rig.Vcpu.ExpectMsgAsync<InterruptPending>();
        Assert.Equal((0x42, true), (again.Vector, again.Seq > withdrawn.Seq));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);
    }

    /// <summary>
    /// A WRMSR of IA32_APIC_BASE that the APIC takes is told to the vcpu before the WRMSR's answer
    /// (so the page moves, and KVM's CPUID bit follows EN, before the guest's next instruction); a
    /// refused one (#GP) or one that changes nothing tells nothing.
    /// </summary>
    [Fact]
    public async Task Vlapic_must_tell_its_vcpu_a_new_apic_base_before_answering_the_wrmsr()
    {
        var rig = Create();
        rig.Vlapic.Tell(new MsrWrite(1, ApicMsrs.ApicBase, 0xBC00_0900), rig.Bus); // relocate (EN | BSP)
        Assert.Equal(new ApicBaseChanged(0, 0xBC00_0900), await rig.Vcpu.ExpectMsgAsync<ApicBaseChanged>());
        Assert.Equal(new MsrWriteResult(1, true), await rig.Bus.ExpectMsgAsync<MsrWriteResult>());

        rig.Vlapic.Tell(new MsrWrite(2, ApicMsrs.ApicBase, 0xBC00_0901), rig.Bus); // reserved bit 0: #GP
        Assert.Equal(new MsrWriteResult(2, false), await rig.Bus.ExpectMsgAsync<MsrWriteResult>());
        rig.Vlapic.Tell(new MsrWrite(3, ApicMsrs.ApicBase, 0xBC00_0900), rig.Bus); // the same value again
        Assert.Equal(new MsrWriteResult(3, true), await rig.Bus.ExpectMsgAsync<MsrWriteResult>());
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);

        rig.Vlapic.Tell(new MsrWrite(4, ApicMsrs.ApicBase, 0xBC00_0100), rig.Bus); // EN clear: disabled globally
        Assert.Equal(new ApicBaseChanged(0, 0xBC00_0100), await rig.Vcpu.ExpectMsgAsync<ApicBaseChanged>());
        Assert.Equal(new MsrWriteResult(4, true), await rig.Bus.ExpectMsgAsync<MsrWriteResult>());
    }

    [Fact]
    public async Task Vlapic_must_ignore_an_acceptance_of_a_vector_it_did_not_request()
    {
        var rig = Create();
        rig.Vlapic.Tell(new InterruptAccepted(0x42)); // a duplicate or a stale one: nothing requested
        Assert.Equal(0u, await ReadAsync(rig, Isr + 0x10 * (0x42 / 32)));
        Assert.Equal(0u, await ReadAsync(rig, Ppr));
    }

    [Fact]
    public async Task Lowest_priority_arbitration_must_pass_over_a_matching_apic_that_is_software_disabled()
    {
        var disabled = Create(vcpuId: 1, enable: false);
        var enabled = Create(vcpuId: 2);
        var interrupt = new DeliverInterrupt(0x61, true, TriggerMode.Edge, DeliveryMode.LowestPriority,
            new Destination(DestinationMode.Logical, 0xFF)); // flat logical, all: both match
        Write(disabled, Ldr, 0x0100_0000);
        Write(enabled, Ldr, 0x0200_0000);

        disabled.Vlapic.Tell(new DeliverToFirstMatch(interrupt, System.Collections.Immutable.ImmutableArray.Create(enabled.Vlapic)));

        Assert.Equal(0x61, (await enabled.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
        await disabled.Vcpu.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task Vlapic_must_report_pending_interrupt_to_its_vcpu()
    {
        var rig = Create(vcpuId: 2);
        rig.Vlapic.Tell(new DeliverInterrupt(0x40, true, TriggerMode.Edge, DeliveryMode.Fixed));

        var pending = await rig.Vcpu.ExpectMsgAsync<InterruptPending>();
        Assert.Equal(new InterruptPending(2, 0x40), pending with { Seq = 0 });

        rig.Vlapic.Tell(new DeliverInterrupt(0x40, true, TriggerMode.Edge, DeliveryMode.Fixed));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet); // already reported, not yet accepted
    }

    [Fact]
    public async Task Vlapic_must_report_the_next_vector_after_the_vcpu_accepts_and_the_guest_EOIs()
    {
        var rig = Create();
        rig.Vlapic.Tell(new DeliverInterrupt(0x30, true, TriggerMode.Edge, DeliveryMode.Fixed));
        Assert.Equal(0x30, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
        rig.Vlapic.Tell(new DeliverInterrupt(0x50, true, TriggerMode.Edge, DeliveryMode.Fixed));
        Assert.Equal(0x50, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector); // supersedes 0x30

        rig.Vlapic.Tell(new InterruptAccepted(0x50), rig.Vcpu);
        await rig.Vcpu.ExpectNoMsgAsync(Quiet); // 0x30 is below the in-service class

        Assert.NotEqual(0u, await ReadAsync(rig, VectorRegister(Isr, 0x50)) & (1u << (0x50 & 31)));
        Write(rig, ApicOffsets.Eoi, 0);
        Assert.Equal(new InterruptPending(0, 0x30), (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()) with { Seq = 0 });
    }

    [Fact]
    public async Task Vlapic_must_hold_a_vector_below_TPR_until_TPR_is_lowered()
    {
        var rig = Create();
        Write(rig, Tpr, 0x50);
        Assert.Equal(new TaskPriorityChanged(0, 0x50), await rig.Vcpu.ExpectMsgAsync<TaskPriorityChanged>()); // for CR8
        rig.Vlapic.Tell(new DeliverInterrupt(0x45, true, TriggerMode.Edge, DeliveryMode.Fixed));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);

        Write(rig, Tpr, 0x30);
        Assert.Equal(0x45, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
        Assert.Equal(new TaskPriorityChanged(0, 0x30), await rig.Vcpu.ExpectMsgAsync<TaskPriorityChanged>());
    }

    [Fact]
    public async Task Vlapic_must_send_an_IPI_to_the_router_on_an_ICR_write()
    {
        var rig = Create(vcpuId: 1);
        Write(rig, IcrHigh, 0x0300_0000);
        Write(rig, IcrLow, 0x0000_4041);

        var ipi = await rig.Router.ExpectMsgAsync<Ipi>();
        Assert.Equal(new Ipi(1, 0x41, DeliveryMode.Fixed, DestinationMode.Physical, true, TriggerMode.Edge, Shorthand.None, 3), ipi);
        Assert.Equal(rig.Vlapic, rig.Router.LastSender);
    }

    [Fact]
    public async Task Vlapic_must_send_an_x2APIC_ICR_write_as_an_IPI_and_answer_MSRs()
    {
        var rig = Create(vcpuId: 3);
        rig.Vlapic.Tell(new MsrRead(1, 0x802), rig.Vcpu);
        Assert.Equal(new MsrReadResult(1, false, 0), await rig.Vcpu.ExpectMsgAsync<MsrReadResult>()); // #GP in xAPIC mode

        rig.Vlapic.Tell(new SetApicBase(2, LocalApic.DefaultBaseAddress | LocalApic.BaseEnable | LocalApic.BaseExtd), rig.Vcpu);
        Assert.Equal(new ApicBaseChanged(3, 0xFEE0_0C00), await rig.Vcpu.ExpectMsgAsync<ApicBaseChanged>());
        Assert.Equal(new MsrWriteResult(2, true), await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>());
        rig.Vlapic.Tell(new MsrRead(3, 0x802), rig.Vcpu);
        Assert.Equal(new MsrReadResult(3, true, 3), await rig.Vcpu.ExpectMsgAsync<MsrReadResult>());

        rig.Vlapic.Tell(new MsrWrite(4, ApicMsrs.X2ApicIcr, (7UL << 32) | 0x4_0000 | 0x4000 | 0x0500), rig.Vcpu); // INIT, self: undefined, dropped
        Assert.Equal(new MsrWriteResult(4, true), await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>());
        rig.Vlapic.Tell(new MsrWrite(5, ApicMsrs.X2ApicIcr, (7UL << 32) | 0x4000 | 0x0500), rig.Vcpu);
        Assert.Equal(new MsrWriteResult(5, true), await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>());
        Assert.Equal(new Ipi(3, 0, DeliveryMode.Init, DestinationMode.Physical, true, TriggerMode.Edge, Shorthand.None, 7),
            await rig.Router.ExpectMsgAsync<Ipi>());

        rig.Vlapic.Tell(new MsrWrite(6, 0x809, 0), rig.Vcpu);
        Assert.Equal(new MsrWriteResult(6, false), await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>());
    }

    [Fact]
    public async Task Vlapic_must_deliver_a_SELF_IPI_to_its_own_vcpu_without_the_router()
    {
        var rig = Create();
        rig.Vlapic.Tell(new SetApicBase(1, LocalApic.DefaultBaseAddress | LocalApic.BaseEnable | LocalApic.BaseExtd), rig.Vcpu);
        Assert.Equal(new ApicBaseChanged(0, 0xFEE0_0D00), await rig.Vcpu.ExpectMsgAsync<ApicBaseChanged>()); // BSP kept
        await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>();
        rig.Vlapic.Tell(new MsrWrite(2, ApicMsrs.X2ApicSelfIpi, 0x77), rig.Vcpu);

        await rig.Vcpu.ExpectMsgAsync<MsrWriteResult>();
        Assert.Equal(new InterruptPending(0, 0x77), (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()) with { Seq = 0 });
        await rig.Router.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task Vlapic_must_filter_deliveries_by_destination()
    {
        var rig = Create(vcpuId: 1);
        rig.Vlapic.Tell(new DeliverInterrupt(0x40, true, TriggerMode.Edge, DeliveryMode.Fixed, new Destination(DestinationMode.Physical, 2)));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);

        Write(rig, Ldr, 0x0200_0000); // flat logical ID bit 1
        rig.Vlapic.Tell(new DeliverInterrupt(0x41, true, TriggerMode.Edge, DeliveryMode.Fixed, new Destination(DestinationMode.Logical, 0x02)));
        Assert.Equal(0x41, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
        rig.Vlapic.Tell(new DeliverInterrupt(0x42, true, TriggerMode.Edge, DeliveryMode.Fixed, new Destination(DestinationMode.Physical, 1)));
        Assert.Equal(0x42, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
    }

    [Fact]
    public async Task Vlapic_must_tell_its_vcpu_INIT_SIPI_NMI_and_ExtINT_without_the_lapic_interrupt_flag()
    {
        var rig = Create(vcpuId: 1);
        rig.Vlapic.Tell(new DeliverInterrupt(0, true, TriggerMode.Edge, DeliveryMode.Init));
        rig.Vlapic.Tell(new DeliverInterrupt(0x9A, true, TriggerMode.Edge, DeliveryMode.StartUp));
        rig.Vlapic.Tell(new DeliverInterrupt(0, true, TriggerMode.Edge, DeliveryMode.Nmi));
        rig.Vlapic.Tell(new DeliverInterrupt(0, true, TriggerMode.Edge, DeliveryMode.ExtInt));

        Assert.Equal(new InitReceived(1), await rig.Vcpu.ExpectMsgAsync<InitReceived>());
        Assert.Equal(new StartupReceived(1, 0x9A), await rig.Vcpu.ExpectMsgAsync<StartupReceived>());
        Assert.Equal(new NmiPending(1), await rig.Vcpu.ExpectMsgAsync<NmiPending>());
        Assert.Equal(new ExtIntPending(1), await rig.Vcpu.ExpectMsgAsync<ExtIntPending>());
        Assert.Equal(0xFFu, await ReadAsync(rig, Svr)); // INIT left the APIC software disabled
    }

    [Fact]
    public async Task Vlapic_must_report_a_level_EOI_to_the_EOI_target()
    {
        var rig = Create(vcpuId: 1);
        rig.Vlapic.Tell(new DeliverInterrupt(0x61, true, TriggerMode.Level, DeliveryMode.Fixed));
        await rig.Vcpu.ExpectMsgAsync<InterruptPending>();
        rig.Vlapic.Tell(new InterruptAccepted(0x61), rig.Vcpu);
        Write(rig, ApicOffsets.Eoi, 0);

        Assert.Equal(new LevelEoi(1, 0x61), await rig.Eoi.ExpectMsgAsync<LevelEoi>());
    }

    [Fact]
    public async Task Vlapic_must_deliver_LINT0_ExtINT_from_the_8259()
    {
        var rig = Create();
        Write(rig, LvtLint0, 0x700);
        rig.Vlapic.Tell(new Lint(0, PinChange.Assert));
        Assert.Equal(new ExtIntPending(0), await rig.Vcpu.ExpectMsgAsync<ExtIntPending>());
    }

    [Fact]
    public async Task Vlapic_must_deliver_timer_vector_when_unmasked()
    {
        var rig = Create();
        Write(rig, TimerDivide, 0b1011);
        Write(rig, LvtTimer, 0x31);
        Write(rig, TimerInitialCount, 1_000_000); // 1 ms at the default 1 GHz
        Assert.Equal(1_000_000u, await ReadAsync(rig, TimerCurrentCount)); // the actor has armed its timer

        Scheduler.Advance(TimeSpan.FromMilliseconds(0.5));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);
        Assert.Equal(500_000u, await ReadAsync(rig, TimerCurrentCount));

        Scheduler.Advance(TimeSpan.FromMilliseconds(0.5));
        Assert.Equal(new InterruptPending(0, 0x31), (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()) with { Seq = 0 });
    }

    [Fact]
    public async Task Vlapic_must_keep_firing_a_periodic_timer_and_stay_quiet_while_masked()
    {
        var rig = Create();
        Write(rig, TimerDivide, 0b1011);
        Write(rig, LvtTimer, (1u << 17) | 0x31);
        Write(rig, TimerInitialCount, 1_000_000);
        await ReadAsync(rig, TimerCurrentCount);

        for (var i = 0; i < 3; i++)
        {
            Scheduler.Advance(TimeSpan.FromMilliseconds(1));
            Assert.Equal(0x31, (await rig.Vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
            rig.Vlapic.Tell(new InterruptAccepted(0x31), rig.Vcpu);
            Write(rig, ApicOffsets.Eoi, 0);
        }

        Write(rig, LvtTimer, (1u << 16) | (1u << 17) | 0x31); // masked
        await ReadAsync(rig, TimerCurrentCount);
        Scheduler.Advance(TimeSpan.FromMilliseconds(5));
        await rig.Vcpu.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task Vlapic_must_answer_MMIO_reads_with_the_correlation_id_and_return_write_credits()
    {
        var rig = Create(vcpuId: 5, enable: false);
        Assert.Equal(5u << 24, await ReadAsync(rig, Id));
        Assert.Equal(LocalApic.VersionValue, await ReadAsync(rig, ApicOffsets.Version));

        for (var i = 0; i < DeviceProtocol.CreditBatch; i++) Write(rig, Tpr, (uint)i);
        Assert.Equal(new DeviceProtocol.WriteCredit(DeviceProtocol.CreditBatch), await rig.Bus.ExpectMsgAsync<DeviceProtocol.WriteCredit>());
        Assert.Equal((uint)DeviceProtocol.CreditBatch - 1, await ReadAsync(rig, Tpr));
    }

    [Fact]
    public async Task Vlapic_must_snapshot_and_restore_its_APIC()
    {
        var rig = Create(vcpuId: 1);
        Write(rig, Tpr, 0x20);
        await rig.Vcpu.ExpectMsgAsync<TaskPriorityChanged>();
        rig.Vlapic.Tell(new DeliverInterrupt(0x80, true, TriggerMode.Edge, DeliveryMode.Fixed));
        await rig.Vcpu.ExpectMsgAsync<InterruptPending>();
        rig.Vlapic.Tell(GetState.Instance, TestActor);
        var saved = (await ExpectMsgAsync<StateReply>()).State;

        var other = Create(vcpuId: 2);
        other.Vlapic.Tell(new RestoreState(saved), TestActor);
        Assert.Equal(new StateRestored(2), await ExpectMsgAsync<StateRestored>());
        Assert.Equal(new InterruptPending(2, 0x80), (await other.Vcpu.ExpectMsgAsync<InterruptPending>()) with { Seq = 0 });
        Assert.Equal(new TaskPriorityChanged(2, 0x20), await other.Vcpu.ExpectMsgAsync<TaskPriorityChanged>());
        Assert.Equal(0x20u, await ReadAsync(other, Tpr));
        other.Vlapic.Tell(GetState.Instance, TestActor);
        Assert.Equal(saved, (await ExpectMsgAsync<StateReply>()).State);
    }
}
