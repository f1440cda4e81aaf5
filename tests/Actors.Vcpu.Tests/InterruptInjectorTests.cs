using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu.Tests;

/// <summary><see cref="InterruptInjector"/> as a pure model: what goes in at each entry.</summary>
public sealed class InterruptInjectorTests
{
    [Fact]
    public void Nothing_pending_plans_a_plain_entry()
    {
        var injector = new InterruptInjector();

        Assert.Equal(new EntryPlan(0, null, false, false, false), injector.PlanEntry(ready: true));
        Assert.False(injector.AnyPending);
    }

    [Fact]
    public void The_vlapics_vector_goes_in_when_the_guest_can_take_it_and_is_accepted()
    {
        var injector = new InterruptInjector();
        Assert.True(injector.LapicPending(0x40, seq: 1, cause: 7));

        var blocked = injector.PlanEntry(ready: false);
        Assert.Equal(new EntryPlan(0, null, false, false, RequestWindow: true), blocked);

        var plan = injector.PlanEntry(ready: true);
        Assert.Equal(new EntryPlan(0, 0x40, FromLapic: true, false, false), plan);
        Assert.Equal(7, injector.LapicCause);
        Assert.Equal(1, injector.Injected);
        Assert.False(injector.AnyPending);
    }

    [Fact]
    public void A_newer_report_replaces_the_vector_and_an_older_or_duplicate_one_changes_nothing()
    {
        var injector = new InterruptInjector();
        Assert.True(injector.LapicPending(0x40, seq: 2, cause: 0));
        Assert.False(injector.LapicPending(0x50, seq: 2, cause: 0));
        Assert.False(injector.LapicPending(0x60, seq: 1, cause: 0));
        Assert.True(injector.LapicPending(0x70, seq: 3, cause: 0));

        Assert.Equal((byte?)0x70, injector.PlanEntry(ready: true).Vector);
    }

    [Fact]
    public void A_withdrawn_vector_never_goes_in_unless_a_newer_report_came_first()
    {
        var injector = new InterruptInjector();
        injector.LapicPending(0x40, seq: 1, cause: 0);
        injector.LapicWithdrawn(seq: 2);
        Assert.Null(injector.PlanEntry(ready: true).Vector);

        injector.LapicPending(0x41, seq: 4, cause: 0);
        injector.LapicWithdrawn(seq: 3); // older than the report: stale
        Assert.Equal((byte?)0x41, injector.PlanEntry(ready: true).Vector);
    }

    [Fact]
    public void Cr8_holds_back_a_vector_of_its_priority_class_or_lower_without_asking_for_a_window()
    {
        var injector = new InterruptInjector { Cr8 = 4 };
        injector.LapicPending(0x4F, seq: 1, cause: 0);

        Assert.Equal(new EntryPlan(0, null, false, false, RequestWindow: false), injector.PlanEntry(ready: true));
        Assert.True(injector.AnyPending); // HLT still ends: the guest may lower CR8 next

        injector.Cr8 = 3;
        Assert.Equal((byte?)0x4F, injector.PlanEntry(ready: true).Vector);
    }

    [Fact]
    public void One_vector_per_entry_then_the_next_after_an_exit()
    {
        var injector = new InterruptInjector();
        injector.Request(0x20);
        injector.Request(0x21);
        injector.LapicPending(0x40, seq: 1, cause: 0);

        Assert.Equal(new EntryPlan(0, 0x20, false, false, RequestWindow: true), injector.PlanEntry(ready: true));
        Assert.Null(injector.PlanEntry(ready: true).Vector); // no exit yet: KVM holds one already
        injector.Exited();
        Assert.Equal((byte?)0x21, injector.PlanEntry(ready: true).Vector);
        injector.Exited();
        Assert.Equal(new EntryPlan(0, 0x40, true, false, false), injector.PlanEntry(ready: true));
        Assert.Equal(3, injector.Injected);
    }

    [Fact]
    public void Nmis_go_in_at_every_entry_two_at_most_whatever_the_interrupt_window()
    {
        var injector = new InterruptInjector();
        injector.Nmi();
        injector.Nmi();
        injector.Nmi();

        Assert.Equal(InterruptInjector.MaxNmisPerEntry, injector.PlanEntry(ready: false).Nmis);
        Assert.Equal(0, injector.PlanEntry(ready: false).Nmis);
    }

    [Fact]
    public void An_extint_asks_the_pic_and_the_vector_it_gives_goes_in_at_once()
    {
        var injector = new InterruptInjector();
        injector.ExtInt();

        Assert.Equal(new EntryPlan(0, null, false, AskPic: true, false), injector.PlanEntry(ready: true));
        Assert.Equal((byte?)0x08, injector.Acknowledged(0x08, stillRequested: true));
        Assert.True(injector.AnyPending); // INTR is a level: the PIC still requests
        Assert.Null(injector.PlanEntry(ready: true).Vector); // one per entry
        injector.Exited();
        Assert.True(injector.PlanEntry(ready: true).AskPic);

        Assert.Null(injector.Acknowledged(null, stillRequested: false)); // a spurious INTA
        Assert.False(injector.AnyPending);
        Assert.Equal(1, injector.Injected);
    }

    [Fact]
    public void Init_drops_everything_pending()
    {
        var injector = new InterruptInjector();
        injector.Request(0x20);
        injector.LapicPending(0x40, seq: 1, cause: 0);
        injector.Nmi();
        injector.ExtInt();

        injector.Init();

        Assert.False(injector.AnyPending);
        Assert.Equal(new EntryPlan(0, null, false, false, false), injector.PlanEntry(ready: true));
    }
}

/// <summary><see cref="PendingReply.IsAnsweredBy"/>: only the reply the vcpu waits for completes its exit.</summary>
public sealed class PendingReplyTests
{
    private static readonly DeviceRoute Uart = new("uart", ActorRefs.Nobody);

    [Fact]
    public void A_read_is_answered_by_its_own_result_only()
    {
        var reply = new PendingReply(ReplyKind.DeviceRead, 5, new VmExit.Io(false, 0x3F8, 1, 1, 0, null), Uart);

        Assert.True(reply.IsAnsweredBy(new DeviceProtocol.ReadResult(5, 1)));
        Assert.False(reply.IsAnsweredBy(new DeviceProtocol.ReadResult(4, 1)));
        Assert.False(reply.IsAnsweredBy(new DeviceProtocol.WriteDone(5, false)));
    }

    [Fact]
    public void A_waited_string_write_is_answered_by_each_of_its_elements()
    {
        var reply = new PendingReply(ReplyKind.WaitedWrite, 7, Route: Uart, FirstId: 5);

        Assert.True(reply.IsAnsweredBy(new DeviceProtocol.WriteDone(5, false)));
        Assert.True(reply.IsAnsweredBy(new DeviceProtocol.WriteDone(7, false)));
        Assert.False(reply.IsAnsweredBy(new DeviceProtocol.WriteDone(4, false)));
        Assert.False(reply.IsAnsweredBy(new DeviceProtocol.WriteDone(8, false)));
    }

    [Fact]
    public void An_apic_msr_access_is_answered_by_the_result_of_its_own_kind()
    {
        var read = new PendingReply(ReplyKind.ApicMsr, 3, new VmExit.MsrRead(ApicMsrs.ApicBase, 0));

        Assert.True(read.IsAnsweredBy(new VlapicProtocol.MsrReadResult(3, true, 0)));
        Assert.False(read.IsAnsweredBy(new VlapicProtocol.MsrWriteResult(3, true)));
    }

    [Fact]
    public void An_inta_is_answered_by_its_acknowledgement_and_every_reply_kind_is_known_as_one()
    {
        var reply = new PendingReply(ReplyKind.Inta, 9);

        Assert.True(reply.IsAnsweredBy(new DeviceProtocol.Acknowledged(9, 0x20, false)));
        Assert.False(reply.IsAnsweredBy(new DeviceProtocol.Acknowledged(8, 0x20, false)));
        Assert.True(PendingReply.IsReply(new DeviceProtocol.Acknowledged(8, 0x20, false)));
        Assert.False(PendingReply.IsReply(new DeviceProtocol.WriteCredit(1)));
    }
}
