using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>
/// The APIC timer (SDM Vol 3A §10.5.4) on a <see cref="ActorVmm.Devices.ManualClock"/>. The rig's
/// 10 MHz timer makes one count (divide by 1) one TimeSpan tick.
/// </summary>
public sealed class LocalApicTimerTests
{
    private const uint DivideBy1 = 0b1011;
    private const uint Periodic = 1u << 17;
    private const uint TscDeadline = 2u << 17;
    private const uint Masked = 1u << 16;

    private static TimeSpan Ticks(long n) => TimeSpan.FromTicks(n);

    [Fact]
    public void One_shot_counts_down_from_the_initial_count_and_sets_IRR_at_zero()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 1000);

        Assert.Equal(1000u, rig.Read(TimerCurrentCount));
        Assert.Equal(Ticks(1000), rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(400));
        Assert.Equal(600u, rig.Read(TimerCurrentCount));
        rig.Clock.Advance(Ticks(599));
        rig.Apic.OnDeadline(); // early: nothing yet
        Assert.False(rig.InIrr(0x30));

        rig.Clock.Advance(Ticks(1));
        rig.Apic.OnDeadline();
        Assert.True(rig.InIrr(0x30));
        Assert.False(rig.InTmr(0x30));
        Assert.Equal(0u, rig.Read(TimerCurrentCount));
        Assert.Null(rig.Apic.NextDeadline); // one-shot: stopped
        rig.Clock.Advance(Ticks(5000));
        Assert.Equal(0u, rig.Read(TimerCurrentCount));
    }

    [Fact]
    public void A_late_callback_still_fires_once_and_a_register_read_catches_up_without_one()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 100);
        rig.Clock.Advance(Ticks(250));

        Assert.Equal(0u, rig.Read(TimerCurrentCount)); // the access applies the expiry
        Assert.Equal(0x30, rig.Apic.PendingInterrupt());
        rig.Apic.OnDeadline();
        Assert.Equal(0x30, rig.Take());
        Assert.Null(rig.Apic.PendingInterrupt());
    }

    [Theory]
    [InlineData(0b0000u, 2)]
    [InlineData(0b0001u, 4)]
    [InlineData(0b0010u, 8)]
    [InlineData(0b0011u, 16)]
    [InlineData(0b1000u, 32)]
    [InlineData(0b1001u, 64)]
    [InlineData(0b1010u, 128)]
    [InlineData(0b1011u, 1)]
    public void Divide_configuration_bits_3_1_0_select_the_divisor_figure_10_10(uint dcr, int divisor)
    {
        Assert.Equal(divisor, LocalApic.DivisorOf(dcr));

        var rig = new Rig();
        rig.Write(TimerDivide, dcr);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 10);
        Assert.Equal(Ticks(10L * divisor), rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(5L * divisor));
        Assert.Equal(5u, rig.Read(TimerCurrentCount));
    }

    [Fact]
    public void Changing_the_divisor_while_counting_continues_from_the_current_count()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 1000);
        rig.Clock.Advance(Ticks(400));

        rig.Write(TimerDivide, 0b0000); // divide by 2
        Assert.Equal(600u, rig.Read(TimerCurrentCount));
        rig.Clock.Advance(Ticks(200));
        Assert.Equal(500u, rig.Read(TimerCurrentCount));
        Assert.Equal(Ticks(400 + 1200), rig.Apic.NextDeadline);
    }

    [Fact]
    public void Periodic_mode_reloads_the_initial_count_and_fires_every_period()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, Periodic | 0x31);
        rig.Write(TimerInitialCount, 100);

        rig.Clock.Advance(Ticks(100));
        rig.Apic.OnDeadline();
        Assert.Equal(0x31, rig.Take());
        Assert.Equal(100u, rig.Read(TimerCurrentCount));
        Assert.Equal(Ticks(200), rig.Apic.NextDeadline);

        rig.Clock.Advance(Ticks(50));
        Assert.Equal(50u, rig.Read(TimerCurrentCount));
        rig.Write(Eoi, 0);
        rig.Clock.Advance(Ticks(50));
        rig.Apic.OnDeadline();
        Assert.Equal(0x31, rig.Take());
        Assert.Equal(Ticks(300), rig.Apic.NextDeadline);
    }

    [Fact]
    public void Periods_missed_before_service_coalesce_into_one_IRR_bit()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, Periodic | 0x31);
        rig.Write(TimerInitialCount, 100);

        rig.Clock.Advance(Ticks(350));
        rig.Apic.OnDeadline();
        Assert.Equal(0x31, rig.Take());
        Assert.Null(rig.Apic.PendingInterrupt());
        Assert.Equal(50u, rig.Read(TimerCurrentCount));
        Assert.Equal(Ticks(400), rig.Apic.NextDeadline);
    }

    [Fact]
    public void A_masked_timer_counts_but_does_not_set_IRR_and_needs_no_callback()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, Masked | 0x30);
        rig.Write(TimerInitialCount, 100);
        Assert.Null(rig.Apic.NextDeadline);

        rig.Clock.Advance(Ticks(40));
        Assert.Equal(60u, rig.Read(TimerCurrentCount));
        rig.Clock.Advance(Ticks(100));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x30));

        rig.Write(LvtTimer, 0x30); // unmasking after the expiry does not bring it back
        Assert.False(rig.InIrr(0x30));
        Assert.Null(rig.Apic.NextDeadline);
    }

    [Fact]
    public void Writing_initial_count_zero_stops_the_timer()
    {
        var rig = new Rig();
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 100);
        rig.Write(TimerInitialCount, 0);
        Assert.Null(rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(10_000));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x30));
        Assert.Equal(0u, rig.Read(TimerCurrentCount));
    }

    [Fact]
    public void TSC_deadline_fires_when_the_TSC_reaches_IA32_TSC_DEADLINE_and_clears_it_10_5_4_1()
    {
        var rig = new Rig();
        rig.Write(LvtTimer, TscDeadline | 0x32);
        rig.Write(TimerInitialCount, 1000); // ignored in TSC-deadline mode
        Assert.Equal(0u, rig.Read(TimerInitialCount));
        Assert.Null(rig.Apic.NextDeadline); // not armed yet

        rig.WriteMsr(ApicMsrs.TscDeadline, 500); // TSC at 10 MHz: tick 500
        Assert.Equal(500UL, rig.ReadMsr(ApicMsrs.TscDeadline));
        Assert.Equal(Ticks(500), rig.Apic.NextDeadline);
        Assert.Equal(0u, rig.Read(TimerCurrentCount));

        rig.Clock.Advance(Ticks(499));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x32));
        rig.Clock.Advance(Ticks(1));
        rig.Apic.OnDeadline();
        Assert.True(rig.InIrr(0x32));
        Assert.Equal(0UL, rig.ReadMsr(ApicMsrs.TscDeadline));
        Assert.Null(rig.Apic.NextDeadline);
    }

    [Fact]
    public void A_deadline_write_with_the_guests_TSC_times_the_deadline_by_that_TSC_not_by_the_drifted_pairing()
    {
        // The pairing says TSC = clock ticks (10 MHz); the guest's TSC has fallen 300 ticks behind it.
        var rig = new Rig();
        rig.Write(LvtTimer, TscDeadline | 0x32);
        rig.Clock.Advance(Ticks(1000));
        Assert.True(rig.Apic.WriteMsr(ApicMsrs.TscDeadline, 900, guestTsc: 700)); // 200 ahead of the guest's TSC
        Assert.False(rig.InIrr(0x32)); // the drifted pairing alone would have fired it at once
        Assert.Equal(Ticks(1200), rig.Apic.NextDeadline);
        Assert.Equal(900UL, rig.ReadMsr(ApicMsrs.TscDeadline));

        rig.Clock.Advance(Ticks(199));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x32));
        rig.Clock.Advance(Ticks(1));
        rig.Apic.OnDeadline();
        Assert.True(rig.InIrr(0x32));
        Assert.Equal(0UL, rig.ReadMsr(ApicMsrs.TscDeadline));

        // The other way: the guest's TSC runs ahead; a deadline it has already passed fires at once.
        rig.Take();
        rig.Write(Eoi, 0);
        Assert.True(rig.Apic.WriteMsr(ApicMsrs.TscDeadline, 2000, guestTsc: 2100));
        Assert.True(rig.InIrr(0x32));
    }

    [Fact]
    public void A_TSC_deadline_in_the_past_fires_at_once_and_zero_disarms()
    {
        var rig = new Rig();
        rig.Write(LvtTimer, TscDeadline | 0x32);
        rig.Clock.Advance(Ticks(1000));
        rig.WriteMsr(ApicMsrs.TscDeadline, 10);
        Assert.True(rig.InIrr(0x32));

        rig.Take();
        rig.Write(Eoi, 0);
        rig.WriteMsr(ApicMsrs.TscDeadline, 5000);
        rig.WriteMsr(ApicMsrs.TscDeadline, 0);
        Assert.Null(rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(10_000));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x32));
    }

    [Fact]
    public void IA32_TSC_DEADLINE_reads_zero_and_ignores_writes_outside_TSC_deadline_mode()
    {
        var rig = new Rig();
        rig.Write(LvtTimer, 0x32); // one-shot
        rig.WriteMsr(ApicMsrs.TscDeadline, 500);
        Assert.Equal(0UL, rig.ReadMsr(ApicMsrs.TscDeadline));
        Assert.Null(rig.Apic.NextDeadline);
    }

    [Fact]
    public void Switching_into_TSC_deadline_mode_disarms_a_counting_timer()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 100);
        rig.Write(LvtTimer, TscDeadline | 0x30);

        Assert.Equal(0u, rig.Read(TimerInitialCount));
        Assert.Null(rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(200));
        rig.Apic.OnDeadline();
        Assert.False(rig.InIrr(0x30));
    }

    [Fact]
    public void Switching_periodic_to_one_shot_finishes_the_current_period_then_stops()
    {
        var rig = new Rig();
        rig.Write(TimerDivide, DivideBy1);
        rig.Write(LvtTimer, Periodic | 0x30);
        rig.Write(TimerInitialCount, 100);
        rig.Clock.Advance(Ticks(130));
        rig.Apic.OnDeadline();
        rig.Take();
        rig.Write(Eoi, 0);

        rig.Write(LvtTimer, 0x30); // one-shot
        Assert.Equal(70u, rig.Read(TimerCurrentCount));
        Assert.Equal(Ticks(200), rig.Apic.NextDeadline);
        rig.Clock.Advance(Ticks(70));
        rig.Apic.OnDeadline();
        Assert.Equal(0x30, rig.Take());
        Assert.Null(rig.Apic.NextDeadline);
    }

    [Fact]
    public void The_default_1GHz_bus_counts_nanoseconds_divided_by_2_after_reset()
    {
        var rig = new Rig(options: LapicOptions.Default);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 1_000_000); // divide by 2 (reset value): 2 ms
        Assert.Equal(TimeSpan.FromMilliseconds(2), rig.Apic.NextDeadline);
        rig.Clock.Advance(TimeSpan.FromMilliseconds(1));
        Assert.Equal(500_000u, rig.Read(TimerCurrentCount));
    }
}
