using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>xAPIC register semantics, Intel SDM Vol 3A chapter 10 (§ numbers are that chapter's).</summary>
public sealed class LocalApicRegisterTests
{
    [Fact]
    public void PowerUp_state_is_the_one_of_10_4_7_1()
    {
        var rig = new Rig(id: 2, bsp: true, enabled: false);

        Assert.Equal(2u << 24, rig.Read(Id));
        Assert.Equal(0xFFu, rig.Read(Svr)); // software disabled, spurious vector 0xFF
        Assert.Equal(0xFFFF_FFFFu, rig.Read(Dfr));
        foreach (var lvt in new[] { LvtCmci, LvtTimer, LvtThermal, LvtPerfMon, LvtLint0, LvtLint1, LvtError })
            Assert.Equal(1u << 16, rig.Read(lvt)); // masked, everything else zero
        Assert.Equal(0u, rig.Read(Tpr));
        Assert.Equal(0u, rig.Read(Ldr));
        Assert.Equal(0xFEE0_0000UL | LocalApic.BaseEnable | LocalApic.BaseBsp, rig.Apic.ApicBase);
        Assert.Equal(ApicMode.XApic, rig.Apic.Mode);
    }

    [Fact]
    public void Version_register_reads_version_0x14_and_max_lvt_6_and_ignores_writes_10_4_8()
    {
        var rig = new Rig();
        Assert.Equal(0x0006_0014u, rig.Read(ApicOffsets.Version));
        rig.Write(ApicOffsets.Version, 0xFFFF_FFFF);
        Assert.Equal(0x0006_0014u, rig.Read(ApicOffsets.Version));
    }

    [Fact]
    public void Read_only_registers_ignore_xapic_writes()
    {
        var rig = new Rig(id: 5);
        rig.Apic.Accept(0x41, level: true, TriggerMode.Level);
        rig.Take();

        rig.Write(Id, 0x0900_0000);
        rig.Write(Ppr, 0xFF);
        rig.Write(VectorRegister(Isr, 0x41), 0);
        rig.Write(VectorRegister(Tmr, 0x41), 0);
        rig.Write(VectorRegister(Irr, 0x80), 0xFFFF_FFFF);
        rig.Write(TimerCurrentCount, 1234);

        Assert.Equal(5u << 24, rig.Read(Id));
        Assert.Equal(0x40u, rig.Read(Ppr));
        Assert.True(rig.InIsr(0x41));
        Assert.True(rig.InTmr(0x41));
        Assert.False(rig.InIrr(0x80));
        Assert.Equal(0u, rig.Read(TimerCurrentCount));
        Assert.Equal(ApicError.None, rig.LatchEsr()); // existing registers: no illegal-address error
    }

    [Fact]
    public void Reserved_bits_are_dropped_on_xapic_writes()
    {
        var rig = new Rig();
        rig.Write(Tpr, 0xFFFF_FFFF);
        rig.Write(Ldr, 0xFFFF_FFFF);
        rig.Write(Dfr, 0x0000_0000);
        rig.Write(TimerDivide, 0xFFFF_FFFF);
        rig.Write(LvtTimer, 0xFFFF_FFFF);
        rig.Write(LvtLint0, 0xFFFF_FFFF);
        rig.Write(LvtError, 0xFFFF_FFFF);
        rig.Write(LvtThermal, 0xFFFF_FFFF);
        rig.Write(IcrHigh, 0xFFFF_FFFF);
        rig.Write(Svr, 0xFFFF_FFFF);

        Assert.Equal(0xFFu, rig.Read(Tpr));
        Assert.Equal(0xFF00_0000u, rig.Read(Ldr));
        Assert.Equal(0x0FFF_FFFFu, rig.Read(Dfr)); // cluster model; bits 27:0 read as ones
        Assert.Equal(0b1011u, rig.Read(TimerDivide));
        Assert.Equal(0x0007_00FFu, rig.Read(LvtTimer)); // vector, mask, mode 18:17; no delivery status
        Assert.Equal(0x0001_A7FFu, rig.Read(LvtLint0)); // no delivery status, no remote IRR
        Assert.Equal(0x0001_00FFu, rig.Read(LvtError));
        Assert.Equal(0x0001_07FFu, rig.Read(LvtThermal));
        Assert.Equal(0xFF00_0000u, rig.Read(IcrHigh));
        Assert.Equal(0x3FFu, rig.Read(Svr));
    }

    [Fact]
    public void Unimplemented_offset_reads_zero_and_sets_illegal_register_address_in_ESR()
    {
        var rig = new Rig();
        Assert.Equal(0UL, rig.Apic.ReadMmio(0x040, 4));
        Assert.Equal(ApicError.IllegalRegisterAddress, rig.LatchEsr());

        rig.Write(0x3F0, 0x40); // SELF IPI exists only in x2APIC mode
        Assert.Equal(ApicError.IllegalRegisterAddress, rig.LatchEsr());
        Assert.False(rig.InIrr(0x40));
    }

    [Fact]
    public void Only_aligned_dword_writes_reach_a_register_and_sub_dword_reads_see_its_low_bytes()
    {
        var rig = new Rig(id: 7);
        rig.Apic.WriteMmio(Tpr, 1, 0x30);
        rig.Apic.WriteMmio(Tpr + 4, 4, 0x30);
        rig.Apic.WriteMmio(Tpr, 8, 0x30);
        Assert.Equal(0u, rig.Read(Tpr));

        Assert.Equal(7UL, rig.Apic.ReadMmio(Id + 3, 1));
        Assert.Equal(0x0700UL, rig.Apic.ReadMmio(Id + 2, 2)); // bytes 2..3, little-endian
        Assert.Equal(0UL, rig.Apic.ReadMmio(Id + 4, 4)); // bytes 4..15 of a slot: nothing there
        Assert.Equal(0UL, rig.Apic.ReadMmio(Id, 8));
    }

    [Fact]
    public void ESR_reads_the_errors_latched_by_the_last_write_10_5_3()
    {
        var rig = new Rig();
        rig.Apic.Accept(8, level: true, TriggerMode.Edge);

        Assert.Equal(0u, rig.Read(Esr)); // not visible until software writes ESR
        Assert.Equal(ApicError.ReceivedIllegalVector, rig.LatchEsr());
        Assert.Equal(ApicError.None, rig.LatchEsr()); // the write cleared the accumulator
    }

    [Fact]
    public void Received_illegal_vector_sets_ESR_bit_6_and_is_not_delivered()
    {
        var rig = new Rig();
        Assert.False(rig.Apic.Accept(15, level: true, TriggerMode.Edge));
        Assert.False(rig.InIrr(15));
        Assert.Null(rig.Apic.PendingInterrupt());
        Assert.Equal(ApicError.ReceivedIllegalVector, rig.LatchEsr());
    }

    [Fact]
    public void Send_illegal_vector_sets_ESR_bit_5_and_sends_nothing()
    {
        var rig = new Rig();
        rig.Write(IcrHigh, 1u << 24);
        rig.Write(IcrLow, 0x0000_0003); // fixed, vector 3

        Assert.Empty(rig.Events.Ipis);
        Assert.Equal(ApicError.SendIllegalVector, rig.LatchEsr());
    }

    [Fact]
    public void An_error_raises_the_LVT_Error_interrupt_when_unmasked()
    {
        var rig = new Rig();
        rig.Write(LvtError, 0xFE);
        rig.Apic.Accept(3, level: true, TriggerMode.Edge);
        Assert.Equal(0xFE, rig.Apic.PendingInterrupt());
    }

    [Fact]
    public void LVT_Error_with_an_illegal_vector_records_the_error_without_recursing()
    {
        var rig = new Rig();
        rig.Write(LvtError, 0x05);
        rig.Apic.Accept(3, level: true, TriggerMode.Edge);
        Assert.Null(rig.Apic.PendingInterrupt());
        Assert.Equal(ApicError.ReceivedIllegalVector, rig.LatchEsr());
    }

    [Fact]
    public void PPR_is_TPR_when_its_class_is_at_least_the_in_service_class_else_the_ISRV_class_10_8_3_1()
    {
        var rig = new Rig();
        rig.Write(Tpr, 0x42);
        Assert.Equal(0x42u, rig.Read(Ppr)); // nothing in service

        rig.Write(Tpr, 0);
        rig.Apic.Accept(0x85, level: true, TriggerMode.Edge);
        Assert.Equal(0x85, rig.Take());
        Assert.Equal(0x80u, rig.Read(Ppr)); // ISRV[7:4]:0000

        rig.Write(Tpr, 0x8F);
        Assert.Equal(0x8Fu, rig.Read(Ppr)); // TPR[7:4] == ISRV[7:4]: TPR
        rig.Write(Tpr, 0x7F);
        Assert.Equal(0x80u, rig.Read(Ppr));
        rig.Write(Tpr, 0x95);
        Assert.Equal(0x95u, rig.Read(Ppr));

        rig.Write(Tpr, 0);
        rig.Write(Eoi, 0);
        Assert.Equal(0u, rig.Read(Ppr));
    }

    [Fact]
    public void EOI_clears_the_highest_ISR_bit_and_reports_level_EOI_only_for_TMR_vectors_10_8_5()
    {
        var rig = new Rig();
        rig.Apic.Accept(0x50, level: true, TriggerMode.Edge);
        Assert.Equal(0x50, rig.Take());
        rig.Apic.Accept(0x60, level: true, TriggerMode.Level);
        Assert.Equal(0x60, rig.Take()); // nested: higher class than the one in service
        Assert.True(rig.InIsr(0x50) && rig.InIsr(0x60));

        rig.Write(Eoi, 0);
        Assert.False(rig.InIsr(0x60));
        Assert.True(rig.InIsr(0x50));
        Assert.Equal([0x60], rig.Events.LevelEois);

        rig.Write(Eoi, 0);
        Assert.False(rig.InIsr(0x50));
        Assert.Equal([0x60], rig.Events.LevelEois); // edge: no EOI message

        rig.Write(Eoi, 0); // nothing in service: ignored
        Assert.Equal([0x60], rig.Events.LevelEois);
    }

    [Fact]
    public void TMR_is_set_by_a_level_triggered_accept_and_cleared_by_an_edge_one_10_8_4()
    {
        var rig = new Rig();
        rig.Apic.Accept(0x70, level: true, TriggerMode.Level);
        Assert.True(rig.InIrr(0x70));
        Assert.True(rig.InTmr(0x70));

        rig.Take();
        rig.Write(Eoi, 0);
        rig.Apic.Accept(0x70, level: true, TriggerMode.Edge);
        Assert.False(rig.InTmr(0x70));
    }

    [Fact]
    public void A_level_triggered_deassert_message_carries_no_interrupt()
    {
        var rig = new Rig();
        rig.Vlapic.Deliver(DeliveryMode.Fixed, 0x70, level: false, TriggerMode.Level);
        Assert.False(rig.InIrr(0x70));
    }

    [Fact]
    public void Arbitration_delivers_the_highest_IRR_vector_above_the_PPR_class()
    {
        var rig = new Rig();
        rig.Apic.Accept(0x31, level: true, TriggerMode.Edge);
        rig.Apic.Accept(0x92, level: true, TriggerMode.Edge);
        rig.Apic.Accept(0x45, level: true, TriggerMode.Edge);

        Assert.Equal(0x92, rig.Take());
        Assert.Null(rig.Apic.PendingInterrupt()); // 0x45 and 0x31 wait for the EOI
        rig.Write(Eoi, 0);
        Assert.Equal(0x45, rig.Take());
        rig.Write(Eoi, 0);
        Assert.Equal(0x31, rig.Take());
    }

    [Fact]
    public void A_vector_of_the_class_in_service_waits_for_its_EOI()
    {
        var rig = new Rig();
        rig.Apic.Accept(0x55, level: true, TriggerMode.Edge);
        rig.Take();
        rig.Apic.Accept(0x5A, level: true, TriggerMode.Edge); // higher vector, same class
        Assert.Null(rig.Apic.PendingInterrupt());
        rig.Write(Eoi, 0);
        Assert.Equal(0x5A, rig.Apic.PendingInterrupt());
    }

    [Fact]
    public void TPR_masks_a_lower_priority_class_until_it_is_lowered()
    {
        var rig = new Rig();
        rig.Write(Tpr, 0x50);
        rig.Apic.Accept(0x45, level: true, TriggerMode.Edge);
        Assert.Null(rig.Apic.PendingInterrupt());
        Assert.True(rig.InIrr(0x45)); // held, not lost

        rig.Write(Tpr, 0x40);
        Assert.Null(rig.Apic.PendingInterrupt()); // same class as TPR: still masked
        rig.Apic.Accept(0x61, level: true, TriggerMode.Edge);
        Assert.Equal(0x61, rig.Take()); // a higher class gets through

        rig.Write(Eoi, 0);
        rig.Write(Tpr, 0x3F);
        Assert.Equal(0x45, rig.Apic.PendingInterrupt());
    }

    [Fact]
    public void Software_disable_masks_every_LVT_and_they_cannot_be_unmasked_10_4_7_2()
    {
        var rig = new Rig();
        rig.Write(LvtTimer, 0x20);
        rig.Write(LvtLint1, 0x400);
        Assert.Equal(0x20u, rig.Read(LvtTimer));

        rig.Write(Svr, 0xFF); // APIC software disabled
        Assert.Equal(0x1_0020u, rig.Read(LvtTimer));
        Assert.Equal(0x1_0400u, rig.Read(LvtLint1));
        rig.Write(LvtTimer, 0x20);
        Assert.Equal(0x1_0020u, rig.Read(LvtTimer));

        rig.Write(Svr, 0x1FF); // enabling does not unmask by itself
        Assert.Equal(0x1_0020u, rig.Read(LvtTimer));
        rig.Write(LvtTimer, 0x20);
        Assert.Equal(0x20u, rig.Read(LvtTimer));
    }

    [Fact]
    public void A_software_disabled_APIC_drops_fixed_interrupts_but_takes_NMI_and_INIT()
    {
        var rig = new Rig(enabled: false);
        Assert.False(rig.Apic.Accept(0x40, level: true, TriggerMode.Edge));
        Assert.False(rig.InIrr(0x40));

        Assert.True(rig.Apic.Deliver(DeliveryMode.Nmi, 0, level: true, TriggerMode.Edge));
        Assert.Equal([(VcpuEventKind.Nmi, (byte)0)], rig.Events.VcpuEvents);
    }

    [Fact]
    public void An_ICR_low_write_sends_the_IPI_described_by_ICR_low_and_high_10_6_1()
    {
        var rig = new Rig(id: 1);
        rig.Write(IcrHigh, 0x0300_0000);
        rig.Write(IcrLow, 0x0000_4842); // fixed, logical, assert, edge, no shorthand, vector 0x42

        Assert.Equal([new Ipi(1, 0x42, DeliveryMode.Fixed, DestinationMode.Logical, true, TriggerMode.Edge, Shorthand.None, 0x03)],
            rig.Events.Ipis);
        Assert.Equal(0x0000_4842u, rig.Read(IcrLow)); // delivery status reads idle
    }

    [Fact]
    public void ICR_shorthands_and_INIT_SIPI_are_sent_as_written()
    {
        var rig = new Rig();
        rig.Write(IcrHigh, 0x0200_0000);
        rig.Write(IcrLow, 0x000C_4500); // INIT, assert, all excluding self
        rig.Write(IcrLow, 0x0000_8500); // INIT level de-assert (trigger level, level 0)
        rig.Write(IcrLow, 0x0000_069A); // SIPI vector 0x9A to 2
        rig.Write(IcrLow, 0x0008_0031); // fixed 0x31 to all including self

        Assert.Equal(
        [
            new Ipi(0, 0x00, DeliveryMode.Init, DestinationMode.Physical, true, TriggerMode.Edge, Shorthand.AllExcludingSelf, 2),
            new Ipi(0, 0x00, DeliveryMode.Init, DestinationMode.Physical, false, TriggerMode.Level, Shorthand.None, 2),
            new Ipi(0, 0x9A, DeliveryMode.StartUp, DestinationMode.Physical, false, TriggerMode.Edge, Shorthand.None, 2),
            new Ipi(0, 0x31, DeliveryMode.Fixed, DestinationMode.Physical, false, TriggerMode.Edge, Shorthand.AllIncludingSelf, 2),
        ], rig.Events.Ipis);
    }

    [Fact]
    public void Level_triggered_fixed_IPIs_are_sent_as_edge_with_level_1_and_dropped_with_level_0_table_10_3()
    {
        var rig = new Rig();
        rig.Write(IcrLow, 0x0000_C040); // fixed, level, assert
        rig.Write(IcrLow, 0x0000_8041); // fixed, level, de-assert
        Assert.Equal([new Ipi(0, 0x40, DeliveryMode.Fixed, DestinationMode.Physical, true, TriggerMode.Edge, Shorthand.None, 0)],
            rig.Events.Ipis);
    }

    [Fact]
    public void A_self_shorthand_fixed_IPI_is_accepted_locally_and_never_sent()
    {
        var rig = new Rig();
        rig.Write(IcrLow, 0x0004_0063);
        Assert.Empty(rig.Events.Ipis);
        Assert.Equal(0x63, rig.Apic.PendingInterrupt());
        Assert.False(rig.InTmr(0x63));
    }

    [Fact]
    public void Reserved_ICR_delivery_modes_send_nothing()
    {
        var rig = new Rig();
        rig.Write(IcrLow, 0x0000_0340); // 011b
        rig.Write(IcrLow, 0x0000_0740); // 111b (ExtINT is not an ICR mode)
        Assert.Empty(rig.Events.Ipis);
    }

    [Fact]
    public void Physical_destination_matches_the_ID_and_the_xAPIC_broadcast()
    {
        var rig = new Rig(id: 3);
        Assert.True(rig.Apic.MatchesPhysical(3));
        Assert.True(rig.Apic.MatchesPhysical(0xFF));
        Assert.False(rig.Apic.MatchesPhysical(4));
    }

    [Fact]
    public void Logical_flat_model_matches_any_shared_bit_of_LDR_31_24()
    {
        var rig = new Rig();
        rig.Write(Ldr, 0x0400_0000); // logical ID bit 2
        Assert.True(rig.Apic.MatchesLogical(0x04));
        Assert.True(rig.Apic.MatchesLogical(0x0C));
        Assert.False(rig.Apic.MatchesLogical(0x03));
        Assert.True(rig.Apic.MatchesLogical(0xFF));
    }

    [Fact]
    public void Logical_cluster_model_matches_the_cluster_and_a_member_bit()
    {
        var rig = new Rig();
        rig.Write(Dfr, 0x0FFF_FFFF); // cluster model
        rig.Write(Ldr, 0x2100_0000); // cluster 2, member bit 0
        Assert.True(rig.Apic.MatchesLogical(0x21));
        Assert.True(rig.Apic.MatchesLogical(0x23));
        Assert.False(rig.Apic.MatchesLogical(0x22)); // right cluster, other members
        Assert.False(rig.Apic.MatchesLogical(0x11)); // other cluster
        Assert.True(rig.Apic.MatchesLogical(0xFF));
    }

    [Fact]
    public void INIT_resets_the_APIC_except_its_ID_and_base_10_4_7_3()
    {
        var rig = new Rig(id: 4, bsp: false);
        rig.Write(Tpr, 0x20);
        rig.Write(Ldr, 0x0800_0000);
        rig.Write(LvtTimer, 0x30);
        rig.Write(TimerInitialCount, 1000);
        rig.Apic.Accept(0x44, level: true, TriggerMode.Level);
        var baseBefore = rig.Apic.ApicBase;

        Assert.True(rig.Apic.Deliver(DeliveryMode.Init, 0, level: true, TriggerMode.Edge));

        Assert.Equal([(VcpuEventKind.Init, (byte)0)], rig.Events.VcpuEvents);
        Assert.Equal(4u << 24, rig.Read(Id));
        Assert.Equal(baseBefore, rig.Apic.ApicBase);
        Assert.Equal(0u, rig.Read(Tpr));
        Assert.Equal(0u, rig.Read(Ldr));
        Assert.Equal(0xFFu, rig.Read(Svr));
        Assert.Equal(0x1_0000u, rig.Read(LvtTimer));
        Assert.Equal(0u, rig.Read(TimerInitialCount));
        Assert.Equal(0u, rig.Read(TimerCurrentCount));
        Assert.False(rig.InIrr(0x44));
        Assert.False(rig.InTmr(0x44));
        Assert.Null(rig.Apic.NextDeadline);
    }

    [Fact]
    public void INIT_level_deassert_has_no_effect()
    {
        var rig = new Rig();
        rig.Write(Tpr, 0x20);
        rig.Vlapic.Deliver(DeliveryMode.Init, 0, level: false, TriggerMode.Level);
        Assert.Equal(0x20u, rig.Read(Tpr));
        Assert.Empty(rig.Events.VcpuEvents);
    }

    [Fact]
    public void NMI_SMI_SIPI_and_ExtINT_messages_go_to_the_vcpu_not_to_IRR()
    {
        var rig = new Rig();
        rig.Apic.Deliver(DeliveryMode.Nmi, 0x99, level: true, TriggerMode.Edge);
        rig.Apic.Deliver(DeliveryMode.Smi, 0, level: true, TriggerMode.Edge);
        rig.Apic.Deliver(DeliveryMode.StartUp, 0x9A, level: true, TriggerMode.Edge);
        rig.Apic.Deliver(DeliveryMode.ExtInt, 0, level: true, TriggerMode.Edge);

        Assert.Equal([(VcpuEventKind.Nmi, (byte)0), (VcpuEventKind.Smi, (byte)0), (VcpuEventKind.StartUp, (byte)0x9A), (VcpuEventKind.ExtInt, (byte)0)],
            rig.Events.VcpuEvents);
        Assert.False(rig.InIrr(0x99));
        Assert.False(rig.InIrr(0x9A));
    }

    [Fact]
    public void LINT0_in_ExtINT_mode_asks_the_vcpu_for_an_INTA_while_unmasked()
    {
        var rig = new Rig();
        rig.Apic.Lint0.Assert();
        Assert.Empty(rig.Events.VcpuEvents); // masked at reset

        rig.Write(LvtLint0, 0x700); // ExtINT, unmasked, with the line still high: delivered now
        Assert.Equal([(VcpuEventKind.ExtInt, (byte)0)], rig.Events.VcpuEvents);
        rig.Apic.Lint0.Deassert();
        rig.Apic.Lint0.Pulse();
        Assert.Equal(2, rig.Events.VcpuEvents.Count);
    }

    [Fact]
    public void LINT1_in_NMI_mode_is_edge_sensitive()
    {
        var rig = new Rig();
        rig.Write(LvtLint1, 0x400);
        rig.Apic.Lint1.Assert();
        rig.Apic.Lint1.Assert(); // still high: no new edge
        rig.Apic.Lint1.Deassert();
        rig.Apic.Lint1.Pulse();
        Assert.Equal([(VcpuEventKind.Nmi, (byte)0), (VcpuEventKind.Nmi, (byte)0)], rig.Events.VcpuEvents);
    }

    [Fact]
    public void A_level_triggered_fixed_LINT_sets_remote_IRR_and_redelivers_after_EOI_while_asserted()
    {
        var rig = new Rig();
        rig.Write(LvtLint0, 0x8000 | 0x31);
        rig.Apic.Lint0.Assert();

        Assert.True(rig.InTmr(0x31));
        Assert.NotEqual(0u, rig.Read(LvtLint0) & (1u << 14)); // remote IRR
        Assert.Equal(0x31, rig.Take());
        rig.Apic.Lint0.Assert(); // remote IRR set: no second delivery
        Assert.False(rig.InIrr(0x31));

        rig.Write(Eoi, 0);
        Assert.Equal([0x31], rig.Events.LevelEois);
        Assert.True(rig.InIrr(0x31)); // line still high: delivered again
        Assert.Equal(0x31, rig.Take());

        rig.Apic.Lint0.Deassert();
        rig.Write(Eoi, 0);
        Assert.Equal(0u, rig.Read(LvtLint0) & (1u << 14));
        Assert.Null(rig.Apic.PendingInterrupt());
    }

    [Fact]
    public void With_the_APIC_globally_disabled_LINT0_and_LINT1_are_the_INTR_and_NMI_pins_10_4_3()
    {
        var rig = new Rig();
        Assert.True(rig.Apic.WriteApicBase(LocalApic.DefaultBaseAddress)); // EN = 0
        rig.Apic.Lint0.Assert();
        rig.Apic.Lint1.Pulse();
        Assert.Equal([(VcpuEventKind.ExtInt, (byte)0), (VcpuEventKind.Nmi, (byte)0)], rig.Events.VcpuEvents);
        Assert.Equal(ulong.MaxValue >> 32, rig.Apic.ReadMmio(Id, 4)); // the page is not decoded
        Assert.False(rig.Apic.Accept(0x40, level: true, TriggerMode.Edge));
        Assert.False(rig.Apic.MatchesPhysical(0));
    }

    [Fact]
    public void Snapshot_round_trip_restores_registers_and_the_running_timer()
    {
        var rig = new Rig(id: 3);
        rig.Write(Tpr, 0x20);
        rig.Write(Ldr, 0x0800_0000);
        rig.Write(TimerDivide, 0b1011);
        rig.Write(LvtTimer, (1u << 17) | 0x33); // periodic
        rig.Write(TimerInitialCount, 1000);
        rig.Apic.Accept(0x81, level: true, TriggerMode.Level);
        rig.Take();
        rig.Apic.Accept(0x52, level: true, TriggerMode.Edge);
        rig.Apic.Accept(4, level: true, TriggerMode.Edge); // an error waiting in the ESR accumulator
        rig.Clock.Advance(TimeSpan.FromTicks(1250));
        rig.Apic.OnDeadline();

        var state = rig.Apic.State();
        Assert.Equal(750u, BitConverter.ToUInt32(state.ApicPage.AsSpan().Slice(TimerCurrentCount, 4)));
        var copy = LocalApic.FromState(state, rig.Events, rig.Clock, Rig.TickOptions);

        Assert.Equal(state, copy.State());
        foreach (var r in new[] { Id, Tpr, Ppr, Ldr, Svr, LvtTimer, TimerInitialCount, TimerCurrentCount, VectorRegister(Isr, 0x81), VectorRegister(Irr, 0x52) })
            Assert.Equal(rig.Apic.ReadMmio((ulong)r, 4), copy.ReadMmio((ulong)r, 4));
        Assert.Equal(rig.Apic.NextDeadline, copy.NextDeadline);
        copy.WriteMmio(Esr, 4, 0);
        Assert.Equal((ulong)ApicError.ReceivedIllegalVector, copy.ReadMmio(Esr, 4));
    }
}
