using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>x2APIC mode and IA32_APIC_BASE transitions (SDM Vol 3A §10.12).</summary>
public sealed class X2ApicTests
{
    private const ulong Base = LocalApic.DefaultBaseAddress;
    private const ulong En = LocalApic.BaseEnable;
    private const ulong Extd = LocalApic.BaseExtd;

    private static uint Msr(int offset) => ApicMsrs.ForOffset(offset);

    [Fact]
    public void Entering_x2APIC_gives_the_32_bit_ID_and_an_LDR_derived_from_it_10_12_5_1()
    {
        var rig = new Rig(id: 0x23);
        rig.Write(Tpr, 0x30);
        rig.Write(Ldr, 0x0100_0000);
        rig.Write(IcrHigh, 0x0500_0000);

        rig.EnterX2Apic();

        Assert.Equal(ApicMode.X2Apic, rig.Apic.Mode);
        Assert.Equal(0x23UL, rig.ReadMsr(0x802));
        Assert.Equal((2UL << 16) | (1UL << 3), rig.ReadMsr(0x80D)); // cluster 0x23 >> 4, bit 0x23 & 0xF
        Assert.Equal(0x30UL, rig.ReadMsr(0x808)); // the rest of the state is kept
        Assert.Equal(0UL, rig.ReadMsr(ApicMsrs.X2ApicIcr) >> 32); // ICR high is not preserved
        Assert.Equal(0x0006_0014UL, rig.ReadMsr(0x803));
    }

    [Theory]
    [InlineData(0x0, 0x0000_0001u)]
    [InlineData(0xF, 0x0000_8000u)]
    [InlineData(0x10, 0x0001_0001u)]
    [InlineData(0x123, 0x0012_0008u)]
    public void X2APIC_LDR_is_cluster_id_over_a_one_hot_member_bit(uint id, uint ldr) =>
        Assert.Equal(ldr, LocalApic.X2ApicLdr(id));

    [Fact]
    public void Mode_transitions_follow_figure_10_27()
    {
        var rig = new Rig(enabled: false);

        Assert.False(rig.Apic.WriteApicBase(Base | Extd)); // EN=0 with EXTD=1 is invalid
        Assert.True(rig.Apic.WriteApicBase(Base)); // xAPIC → disabled
        Assert.Equal(ApicMode.Disabled, rig.Apic.Mode);
        Assert.False(rig.Apic.WriteApicBase(Base | En | Extd)); // disabled → x2APIC directly: #GP
        Assert.Equal(ApicMode.Disabled, rig.Apic.Mode);
        Assert.True(rig.Apic.WriteApicBase(Base | En)); // disabled → xAPIC
        Assert.True(rig.Apic.WriteApicBase(Base | En | Extd)); // xAPIC → x2APIC
        Assert.False(rig.Apic.WriteApicBase(Base | En)); // x2APIC → xAPIC: #GP
        Assert.Equal(ApicMode.X2Apic, rig.Apic.Mode);
        Assert.True(rig.Apic.WriteApicBase(Base)); // x2APIC → disabled
        Assert.True(rig.Apic.WriteApicBase(Base | En)); // → xAPIC again
        Assert.Equal(ApicMode.XApic, rig.Apic.Mode);
    }

    [Fact]
    public void Reserved_IA32_APIC_BASE_bits_fault_and_BSP_is_not_guest_writable()
    {
        var rig = new Rig(bsp: true);
        Assert.False(rig.Apic.WriteApicBase(Base | En | 1));
        Assert.False(rig.Apic.WriteApicBase(Base | En | (1UL << 9)));
        Assert.False(rig.Apic.WriteApicBase(Base | En | (1UL << 46))); // at MAXPHYADDR

        Assert.True(rig.Apic.WriteMsr(ApicMsrs.ApicBase, 0xFED0_0000 | En)); // relocate, BSP written as 0
        Assert.Equal(0xFED0_0000 | En | LocalApic.BaseBsp, rig.ReadMsr(ApicMsrs.ApicBase));

        var noX2 = new Rig(options: Rig.TickOptions with { X2ApicSupported = false });
        Assert.False(noX2.Apic.WriteApicBase(Base | En | Extd));
    }

    [Fact]
    public void Global_disable_returns_the_APIC_to_its_power_up_state_10_4_3()
    {
        var rig = new Rig(id: 1);
        rig.Write(Tpr, 0x30);
        rig.Write(LvtTimer, 0x40);
        rig.Apic.Accept(0x50, level: true, TriggerMode.Edge);
        rig.EnterX2Apic();

        Assert.True(rig.Apic.WriteApicBase(Base));
        Assert.True(rig.Apic.WriteApicBase(Base | En));

        Assert.Equal(1u << 24, rig.Read(Id));
        Assert.Equal(0u, rig.Read(Tpr));
        Assert.Equal(0xFFu, rig.Read(Svr));
        Assert.Equal(0x1_0000u, rig.Read(LvtTimer));
        Assert.False(rig.InIrr(0x50));
    }

    [Fact]
    public void X2APIC_MSRs_fault_outside_x2APIC_mode_and_the_MMIO_page_is_gone_inside_it()
    {
        var rig = new Rig();
        Assert.False(rig.Apic.ReadMsr(0x808, out _));
        Assert.False(rig.Apic.WriteMsr(0x808, 0));

        rig.EnterX2Apic();
        Assert.Equal(0xFFFF_FFFFUL, rig.Apic.ReadMmio(Tpr, 4));
        rig.Apic.WriteMmio(Tpr, 4, 0x20);
        Assert.Equal(0UL, rig.ReadMsr(0x808));
    }

    [Fact]
    public void A_64_bit_ICR_write_sends_an_IPI_with_a_32_bit_destination_10_12_9()
    {
        var rig = new Rig(id: 0x11);
        rig.EnterX2Apic();

        rig.WriteMsr(ApicMsrs.X2ApicIcr, (0x0002_0004UL << 32) | 0x4955); // lowest priority, logical, assert, vector 0x55

        Assert.Equal([new Ipi(0x11, 0x55, DeliveryMode.LowestPriority, DestinationMode.Logical, true, TriggerMode.Edge, Shorthand.None, 0x0002_0004)],
            rig.Events.Ipis);
        Assert.Equal((0x0002_0004UL << 32) | 0x4955, rig.ReadMsr(ApicMsrs.X2ApicIcr));
    }

    [Fact]
    public void ICR_reserved_bits_fault_in_x2APIC_mode()
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        Assert.False(rig.Apic.WriteMsr(ApicMsrs.X2ApicIcr, 0x1040)); // bit 12: delivery status no longer exists
        Assert.False(rig.Apic.WriteMsr(ApicMsrs.X2ApicIcr, 0x2_0040)); // bit 17
        Assert.False(rig.Apic.ReadMsr(0x831, out _)); // no separate ICR high
        Assert.Empty(rig.Events.Ipis);
    }

    [Fact]
    public void SELF_IPI_sets_IRR_and_is_write_only_10_12_11()
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        rig.WriteMsr(ApicMsrs.X2ApicSelfIpi, 0x66);

        Assert.Equal(0x66, rig.Apic.PendingInterrupt());
        Assert.Equal(0UL, rig.ReadMsr(Msr(VectorRegister(Tmr, 0x66))) & (1UL << (0x66 & 31)));
        Assert.Empty(rig.Events.Ipis);
        Assert.False(rig.Apic.ReadMsr(ApicMsrs.X2ApicSelfIpi, out _));
        Assert.False(rig.Apic.WriteMsr(ApicMsrs.X2ApicSelfIpi, 0x166)); // bits 31:8 reserved
    }

    [Fact]
    public void SELF_IPI_with_an_illegal_vector_sets_send_illegal_vector()
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        rig.WriteMsr(ApicMsrs.X2ApicSelfIpi, 7);
        Assert.Null(rig.Apic.PendingInterrupt());
        rig.WriteMsr(Msr(Esr), 0);
        Assert.Equal((ulong)ApicError.SendIllegalVector, rig.ReadMsr(Msr(Esr)));
    }

    [Theory]
    [InlineData(0x802u)] // ID
    [InlineData(0x803u)] // version
    [InlineData(0x80Au)] // PPR
    [InlineData(0x80Du)] // LDR
    [InlineData(0x810u)] // ISR
    [InlineData(0x818u)] // TMR
    [InlineData(0x820u)] // IRR
    [InlineData(0x839u)] // current count
    public void Writing_a_read_only_x2APIC_register_faults(uint msr)
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        Assert.True(rig.Apic.ReadMsr(msr, out var before));
        Assert.False(rig.Apic.WriteMsr(msr, 0));
        Assert.True(rig.Apic.ReadMsr(msr, out var after));
        Assert.Equal(before, after);
    }

    [Theory]
    [InlineData(0x800u)]
    [InlineData(0x809u)] // APR: not in x2APIC
    [InlineData(0x80Cu)] // RRD
    [InlineData(0x80Eu)] // DFR
    [InlineData(0x831u)] // ICR high
    [InlineData(0x83Au)]
    [InlineData(0x840u)]
    [InlineData(0x8FFu)]
    public void Reserved_x2APIC_MSRs_fault_on_read_and_write(uint msr)
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        Assert.False(rig.Apic.ReadMsr(msr, out _));
        Assert.False(rig.Apic.WriteMsr(msr, 0));
    }

    [Fact]
    public void Nonzero_writes_to_reserved_bits_fault_10_12_1_3()
    {
        var rig = new Rig();
        rig.EnterX2Apic();
        Assert.False(rig.Apic.WriteMsr(Msr(Tpr), 0x100));
        Assert.False(rig.Apic.WriteMsr(Msr(Tpr), 1UL << 32));
        Assert.False(rig.Apic.WriteMsr(Msr(Eoi), 1));
        Assert.False(rig.Apic.WriteMsr(Msr(Esr), 1));
        Assert.False(rig.Apic.WriteMsr(Msr(Svr), 0x1000)); // no EOI-broadcast suppression
        Assert.False(rig.Apic.WriteMsr(Msr(LvtTimer), 0x100)); // the timer has no delivery mode
        Assert.False(rig.Apic.WriteMsr(Msr(LvtTimer), 0b11u << 17)); // reserved timer mode
        Assert.False(rig.Apic.WriteMsr(Msr(TimerDivide), 0b0100));
        Assert.False(rig.Apic.ReadMsr(Msr(Eoi), out _)); // write-only

        rig.WriteMsr(Msr(Tpr), 0x20);
        rig.WriteMsr(Msr(Eoi), 0);
        rig.WriteMsr(Msr(LvtLint0), 0x1_0000 | (1u << 14)); // remote IRR is read-only, not reserved: ignored
        Assert.Equal(0x1_0000UL, rig.ReadMsr(Msr(LvtLint0)));
        Assert.Equal(0x20UL, rig.ReadMsr(Msr(Tpr)));
    }

    [Fact]
    public void X2APIC_destinations_physical_and_cluster_logical_10_12_10()
    {
        var rig = new Rig(id: 0x23);
        rig.EnterX2Apic();

        Assert.True(rig.Apic.MatchesPhysical(0x23));
        Assert.True(rig.Apic.MatchesPhysical(0xFFFF_FFFF));
        Assert.False(rig.Apic.MatchesPhysical(0xFF)); // not a broadcast in x2APIC mode

        Assert.True(rig.Apic.MatchesLogical(0x0002_0008));
        Assert.True(rig.Apic.MatchesLogical(0x0002_FFFF));
        Assert.False(rig.Apic.MatchesLogical(0x0002_0004)); // right cluster, other member
        Assert.False(rig.Apic.MatchesLogical(0x0001_0008)); // other cluster
        Assert.True(rig.Apic.MatchesLogical(0xFFFF_FFFF));
    }

    [Fact]
    public void INIT_keeps_x2APIC_mode_with_its_ID_and_LDR()
    {
        var rig = new Rig(id: 0x12);
        rig.EnterX2Apic();
        rig.WriteMsr(Msr(Tpr), 0x40);

        rig.Apic.Deliver(DeliveryMode.Init, 0, level: true, TriggerMode.Edge);

        Assert.Equal(ApicMode.X2Apic, rig.Apic.Mode);
        Assert.Equal(0x12UL, rig.ReadMsr(0x802));
        Assert.Equal(LocalApic.X2ApicLdr(0x12), (uint)rig.ReadMsr(0x80D));
        Assert.Equal(0UL, rig.ReadMsr(Msr(Tpr)));
        Assert.Equal(0xFFUL, rig.ReadMsr(Msr(Svr)));
    }
}
