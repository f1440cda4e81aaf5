using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using Xunit.Abstractions;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu.Tests;

/// <summary>
/// The vcpu's side of the vlapic protocol, with probes for the vlapic, the PIC and the VM:
/// InterruptPending → KVM_INTERRUPT + InterruptAccepted, the interrupt window, NMI, APIC MSR
/// exits, ExtINT's INTA, INIT/SIPI.
/// </summary>
public sealed class VcpuInterruptTests : TestKit
{
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);
    private readonly List<(IActorRef Actor, ScriptedVcpu Fake)> _started = [];

    static VcpuInterruptTests()
    {
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 32), io);
    }

    public VcpuInterruptTests(ITestOutputHelper output) : base(VcpuProtocol.DefaultConfig, output)
    {
    }

    private sealed record Rig(ScriptedVcpu Fake, IActorRef Vcpu, TestProbe Vlapic, TestProbe Pic, TestProbe Vm);

    private Rig Create(int id = 0, bool start = true)
    {
        var fake = new ScriptedVcpu(id);
        var vlapic = CreateTestProbe("vlapic");
        var pic = CreateTestProbe("pic");
        var vm = CreateTestProbe("vm");
        var wiring = new Wiring(AddressBus<DeviceRoute>.Empty,
            AddressBus<DeviceRoute>.Empty.Insert(new DeviceRoute("vlapic", vlapic.Ref), 0xFEE0_0000, 0x1000),
            vm.Ref, null, vlapic.Ref, pic.Ref);
        var actor = Sys.ActorOf(PropsForTest(fake, wiring), $"vcpu-{id}");
        _started.Add((actor, fake));
        if (start)
        {
            actor.Tell(Start.Instance);
            Assert.True(fake.WaitUntilIdleInGuest());
        }
        return new Rig(fake, actor, vlapic, pic, vm);
    }

    protected override void Dispose(bool disposing)
    {
        foreach (var (actor, fake) in _started)
        {
            actor.Tell(Stop.Instance, ActorRefs.NoSender);
            fake.Dispose();
        }
        base.Dispose(disposing);
    }

    [Fact]
    public async Task Vcpu_must_inject_a_pending_vector_and_tell_its_vlapic_it_was_accepted()
    {
        var rig = Create();
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x41), rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Count == 1));
        Assert.Equal(new byte[] { 0x41 }, rig.Fake.Injected);
        Assert.Equal(new VlapicProtocol.InterruptAccepted(0x41), await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.InterruptAccepted>());
        Assert.True(rig.Fake.IntrReturned >= 1, "the event did not kick the vcpu out of the guest");
    }

    [Fact]
    public async Task Vcpu_must_wait_for_the_window_rechecking_on_every_exit_and_inject_only_the_newest_vector()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x41));
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x51));
        Assert.True(rig.Fake.WaitUntil(f => f.InterruptWindowRequested && f.InRun));
        Assert.Empty(rig.Fake.Injected);

        // No IRQ_WINDOW_OPEN exit: any exit with the guest ready is enough.
        rig.Fake.ReadyForInterruptInjection = true;
        rig.Fake.Supply(VmExit.Intr.Instance);
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Count == 1));
        Assert.Equal(new byte[] { 0x51 }, rig.Fake.Injected);
        Assert.Equal(0x51, (await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.InterruptAccepted>()).Vector);
        await rig.Vlapic.ExpectNoMsgAsync(Quiet);
        Assert.True(rig.Fake.WaitUntil(f => !f.InterruptWindowRequested));
    }

    [Fact]
    public async Task Vcpu_must_inject_a_vector_once_when_its_report_comes_twice()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        var report = new VlapicProtocol.InterruptPending(0, 0x41, Seq: 7);
        rig.Vcpu.Tell(report, rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => f.InterruptWindowRequested && f.InRun));
        rig.Fake.ReadyForInterruptInjection = true;
        rig.Fake.Supply(VmExit.Intr.Instance);
        Assert.Equal(0x41, (await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.InterruptAccepted>()).Vector);

        rig.Vcpu.Tell(report, rig.Vlapic.Ref);                                             // a duplicate
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x42, Seq: 6), rig.Vlapic.Ref); // an older one, late
        rig.Fake.Supply(VmExit.Intr.Instance);
        await rig.Vlapic.ExpectNoMsgAsync(Quiet);
        Assert.Equal(new byte[] { 0x41 }, rig.Fake.Injected);
    }

    [Fact]
    public async Task Vcpu_must_drop_a_vector_its_vlapic_takes_back_before_injecting_it()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x41, Seq: 1), rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => f.InterruptWindowRequested && f.InRun));
        rig.Vcpu.Tell(new VlapicProtocol.NoInterruptPending(0, Seq: 2), rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => !f.InterruptWindowRequested && f.InRun));
        rig.Fake.ReadyForInterruptInjection = true;
        rig.Fake.Supply(VmExit.Intr.Instance);
        await rig.Vlapic.ExpectNoMsgAsync(Quiet);
        Assert.Empty(rig.Fake.Injected);
    }

    [Fact]
    public async Task Vcpu_must_hold_back_a_vector_its_guests_cr8_masks_and_tell_the_vlapic_the_new_tpr()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        rig.Fake.Cr8 = 5;                       // the guest raised CR8 (no exit for that)
        rig.Fake.Supply(VmExit.Intr.Instance);  // the next exit shows it
        Assert.Equal(new VlapicProtocol.SetTaskPriority(0x50), await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.SetTaskPriority>());

        rig.Fake.ReadyForInterruptInjection = true;
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x42, Seq: 1), rig.Vlapic.Ref); // class 4 <= 5
        rig.Fake.Supply(VmExit.Intr.Instance);
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        Assert.Empty(rig.Fake.Injected);
        Assert.False(rig.Fake.InterruptWindowRequested); // no window while CR8 masks it: it would exit at once

        rig.Fake.Cr8 = 0;
        rig.Fake.Supply(VmExit.SetTpr.Instance); // lowering CR8 exits
        Assert.Equal(new VlapicProtocol.SetTaskPriority(0), await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.SetTaskPriority>());
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Count == 1));
        Assert.Equal(new byte[] { 0x42 }, rig.Fake.Injected);
    }

    [Fact]
    public void Vcpu_must_load_a_tpr_written_through_the_apic_page_into_the_guests_cr8()
    {
        var rig = Create();
        rig.Vcpu.Tell(new VlapicProtocol.TaskPriorityChanged(0, 0x70), rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => f.Cr8 == 7));
    }

    [Fact]
    public void A_halted_vcpu_must_wake_for_a_pending_interrupt()
    {
        var rig = Create();
        rig.Fake.Supply(VmExit.Hlt.Instance);
        Assert.True(rig.Fake.WaitUntil(f => f.Consumed == 1)); // halted (IF=1: the VM is not told)
        var runs = rig.Fake.Runs;
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x30));
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Contains((byte)0x30) && f.Runs > runs));
    }

    [Fact]
    public void Nmi_must_be_queued_with_kvm_nmi()
    {
        var rig = Create();
        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0));
        Assert.True(rig.Fake.WaitUntil(f => f.NmisInjected == 1));
        Assert.Empty(rig.Fake.Injected);
    }

    /// <summary>
    /// NMIs that reach the vcpu between two entries are not merged (SDM Vol 3A §6.7.1: one is
    /// taken, one more is latched until the handler's IRET): each is one KVM_NMI, at most two per
    /// entry, since a processor latches no more than one while another is delivered.
    /// </summary>
    [Fact]
    public async Task Nmis_arriving_between_two_entries_must_each_be_queued_up_to_one_taken_and_one_latched()
    {
        var rig = Create();
        var probe = CreateTestProbe();
        rig.Vcpu.Tell(Pause.Instance, probe.Ref);
        await probe.ExpectMsgAsync<Paused>();
        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0));
        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0));
        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0));
        rig.Vcpu.Tell(Resume.Instance, probe.Ref);
        await probe.ExpectMsgAsync<Resumed>();
        Assert.True(rig.Fake.WaitUntil(f => f.NmisInjected == 2 && f.InRun));
        await Task.Delay(Quiet);
        Assert.Equal(2, rig.Fake.NmisInjected);
    }

    /// <summary>
    /// The xAPIC page follows IA32_APIC_BASE (SDM Vol 3A §10.4.4-10.4.5): decoded at 0xFEE00000
    /// from reset, at the new base after the vlapic reports a relocation (the old address is then
    /// an unassigned one, all-ones), nowhere in x2APIC mode; and every value reported goes to KVM
    /// (CPUID.01H:EDX.APIC follows its EN bit there).
    /// </summary>
    [Fact]
    public async Task The_apic_page_must_move_with_ia32_apic_base_and_kvm_must_be_told_each_value()
    {
        var fake = new ScriptedVcpu(0);
        var vlapic = CreateTestProbe("vlapic");
        var page = new DeviceRoute("vlapic", vlapic.Ref);
        var wiring = new Wiring(AddressBus<DeviceRoute>.Empty, AddressBus<DeviceRoute>.Empty, CreateTestProbe("vm").Ref, null,
            vlapic.Ref, ApicPage: page);
        var actor = Sys.ActorOf(PropsForTest(fake, wiring), "vcpu-0");
        _started.Add((actor, fake));
        actor.Tell(Start.Instance);
        Assert.True(fake.WaitUntilIdleInGuest());

        async Task ReadReachesTheVlapicAt(ulong address)
        {
            fake.Supply(new VmExit.Mmio(address, false, 4, 0));
            var read = await vlapic.ExpectMsgAsync<DeviceProtocol.Read>();
            Assert.Equal(0x30UL, read.Offset);
            actor.Tell(new DeviceProtocol.ReadResult(read.Id, 0x14), vlapic.Ref);
            Assert.True(fake.WaitUntil(f => f.MmioReadCompletions.Count > 0 && f.MmioReadCompletions[^1] == 0x14 && f.IdleInGuest));
        }

        async Task ReadIsUnassignedAt(ulong address)
        {
            var before = fake.MmioReadCompletions.Count;
            fake.Supply(new VmExit.Mmio(address, false, 4, 0));
            Assert.True(fake.WaitUntil(f => f.MmioReadCompletions.Count == before + 1 && f.IdleInGuest));
            Assert.Equal(0xFFFF_FFFFUL, fake.MmioReadCompletions[^1]);
            await vlapic.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(50));
        }

        await ReadReachesTheVlapicAt(0xFEE0_0030);

        actor.Tell(new VlapicProtocol.ApicBaseChanged(0, 0xBC00_0900)); // EN | BSP, page at 0xBC000000
        Assert.True(fake.WaitUntil(f => f.MsrsSet.Length == 1));
        Assert.Equal((0x1BU, 0xBC00_0900UL), (fake.MsrsSet[0].Index, fake.MsrsSet[0].Data));
        await ReadReachesTheVlapicAt(0xBC00_0030);
        await ReadIsUnassignedAt(0xFEE0_0030);

        actor.Tell(new VlapicProtocol.ApicBaseChanged(0, 0xFEE0_0D00)); // EN | EXTD: x2APIC, no page
        Assert.True(fake.WaitUntil(f => f.MsrsSet.Length == 2));
        await ReadIsUnassignedAt(0xFEE0_0030);
        await ReadIsUnassignedAt(0xBC00_0030);
    }

    /// <summary>A vlapic stand-in that answers on the sender's thread (the real one's dispatcher),
    /// first with a stale answer when <paramref name="staleFirst"/>: MSR 0x802 reads as 0x5000 + its
    /// request id, a write is refused when its value is odd.</summary>
    private sealed class AnsweringVlapic : ReceiveActor
    {
        public AnsweringVlapic(bool staleFirst)
        {
            Receive<VlapicProtocol.MsrRead>(r =>
            {
                if (staleFirst) Sender.Tell(new VlapicProtocol.MsrReadResult(r.Id - 1, true, 0xBAD));
                Sender.Tell(new VlapicProtocol.MsrReadResult(r.Id, r.Msr == 0x802, 0x5000 + (ulong)r.Id));
            });
            Receive<VlapicProtocol.MsrWrite>(w =>
            {
                if (staleFirst) Sender.Tell(new VlapicProtocol.MsrWriteResult(w.Id - 1, true));
                Sender.Tell(new VlapicProtocol.MsrWriteResult(w.Id, w.Value % 2 == 0));
            });
        }
    }

    [Theory]
    [InlineData(false)] // the answer is first in line when Tell returns: taken at once
    [InlineData(true)] // a stale answer is first: the vcpu waits for its own as for a device read
    public void Apic_msr_exits_must_complete_with_an_answer_given_on_the_vcpus_own_thread(bool staleFirst)
    {
        var fake = new ScriptedVcpu(0);
        var vlapic = Sys.ActorOf(Akka.Actor.Props.Create(() => new AnsweringVlapic(staleFirst)).WithDispatcher(VcpuProtocol.VlapicDispatcherId));
        var wiring = new Wiring(AddressBus<DeviceRoute>.Empty, AddressBus<DeviceRoute>.Empty, CreateTestProbe("vm").Ref,
            null, vlapic, CreateTestProbe("pic").Ref);
        var actor = Sys.ActorOf(PropsForTest(fake, wiring), "vcpu-0");
        _started.Add((actor, fake));
        actor.Tell(Start.Instance);
        Assert.True(fake.WaitUntilIdleInGuest());

        fake.Supply(new VmExit.MsrRead(0x802, 0), new VmExit.MsrWrite(0x80B, 0, 0), new VmExit.MsrWrite(0x830, 0x41, 0),
            new VmExit.MsrRead(0x803, 0));

        Assert.True(fake.WaitUntil(f => f.MsrReadCompletions.Count == 2 && f.MsrWriteCompletions.Count == 2 && f.IdleInGuest));
        Assert.Equal((0x5001UL, false), fake.MsrReadCompletions[0]); // the first request's own answer, not the stale one
        Assert.True(fake.MsrReadCompletions[1].Fault); // 0x803 refused: #GP
        Assert.Equal([false, true], fake.MsrWriteCompletions); // even value written, odd one refused
    }

    [Fact]
    public async Task Apic_msr_exits_must_wait_for_the_vlapics_answer()
    {
        var rig = Create();
        rig.Fake.Supply(new VmExit.MsrRead(0x802, 0));
        var read = await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.MsrRead>();
        Assert.Equal(0x802u, read.Msr);
        Assert.Empty(rig.Fake.MsrReadCompletions);
        rig.Vlapic.Reply(new VlapicProtocol.MsrReadResult(read.Id, true, 0x1234));
        Assert.True(rig.Fake.WaitUntil(f => f.MsrReadCompletions.Count == 1));
        Assert.Equal((0x1234UL, false), rig.Fake.MsrReadCompletions[0]);

        rig.Fake.Supply(new VmExit.MsrWrite(0x830, 0xFF, 0));
        var write = await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.MsrWrite>();
        rig.Vlapic.Reply(new VlapicProtocol.MsrWriteResult(write.Id, false));
        Assert.True(rig.Fake.WaitUntil(f => f.MsrWriteCompletions.Count == 1));
        Assert.True(rig.Fake.MsrWriteCompletions[0], "a refused write must be a #GP");

        rig.Fake.Supply(new VmExit.MsrRead(0xC000_0100, 0)); // FS_BASE: not the vlapic's
        Assert.True(rig.Fake.WaitUntil(f => f.MsrReadCompletions.Count == 2));
        Assert.True(rig.Fake.MsrReadCompletions[1].Fault);
        await rig.Vlapic.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task ExtInt_must_fetch_the_vector_from_the_pic_then_inject_it()
    {
        var rig = Create();
        rig.Vcpu.Tell(new VlapicProtocol.ExtIntPending(0));
        var inta = await rig.Pic.ExpectMsgAsync<DeviceProtocol.Acknowledge>();
        Assert.Empty(rig.Fake.Injected);
        rig.Pic.Reply(new DeviceProtocol.Acknowledged(inta.Id, 0x20, StillRequested: false));
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.SequenceEqual(new byte[] { 0x20 })));
        await rig.Pic.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task An_ap_must_not_run_before_init_and_sipi_and_then_start_at_the_vector()
    {
        var rig = Create(id: 1, start: false);
        rig.Vcpu.Tell(new VlapicProtocol.StartupReceived(1, 0x10)); // SIPI without INIT: ignored
        rig.Vcpu.Tell(new VlapicProtocol.InitReceived(1));
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.WaitingForSipi, (await ExpectMsgAsync<Stats>()).State);
        Assert.Equal(0, rig.Fake.Runs);

        rig.Vcpu.Tell(new VlapicProtocol.StartupReceived(1, 0x9A));
        Assert.Equal(new StartedBySipi(1, 0x9A), await rig.Vm.ExpectMsgAsync<StartedBySipi>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        var sregs = rig.Fake.SpecialRegisters;
        Assert.Equal(0x9A000UL, sregs.Cs.Base);
        Assert.Equal((ushort)0x9A00, sregs.Cs.Selector);
        Assert.Equal(0x6000_0010UL, sregs.Cr0);
        Assert.Equal(0UL, rig.Fake.Registers.Rip);

        // A second INIT puts it back into wait-for-SIPI.
        rig.Vcpu.Tell(new VlapicProtocol.InitReceived(1));
        await AwaitAssertAsync(async () =>
        {
            rig.Vcpu.Tell(GetStats.Instance);
            Assert.Equal(State.WaitingForSipi, (await ExpectMsgAsync<Stats>()).State);
        });
    }
}
