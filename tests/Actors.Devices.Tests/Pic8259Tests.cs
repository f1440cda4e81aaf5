namespace ActorVmm.Devices.Tests;

public sealed class Pic8259Tests
{
    private const ulong Command = 0, Data = 1;
    private const byte NonSpecificEoi = 0x20, ReadIrr = 0x0A, ReadIsr = 0x0B, Poll = 0x0C;

    private readonly CountingInterruptLine _intr = new();
    private readonly Pic8259Pair _pic;

    public Pic8259Tests() => _pic = new Pic8259Pair(_intr);

    private static void W(IBusDevice chip, ulong offset, byte value) => chip.Write(offset, 1, value);
    private static byte R(IBusDevice chip, ulong offset) => (byte)chip.Read(offset, 1);

    /// <summary>The sequence Linux and SeaBIOS use: ICW1 edge+ICW4, bases 0x20/0x28, cascade on IR2, 8086 mode.</summary>
    private void Init(byte icw4 = 0x01)
    {
        W(_pic.Master, Command, 0x11);
        W(_pic.Master, Data, 0x20);
        W(_pic.Master, Data, 0x04);
        W(_pic.Master, Data, icw4);
        W(_pic.Slave, Command, 0x11);
        W(_pic.Slave, Data, 0x28);
        W(_pic.Slave, Data, 0x02);
        W(_pic.Slave, Data, icw4);
    }

    private byte Isr(IBusDevice chip)
    {
        W(chip, Command, ReadIsr);
        var isr = R(chip, Command);
        W(chip, Command, ReadIrr);
        return isr;
    }

    [Fact]
    public void Init_sequence_sets_the_vector_bases_and_clears_the_masks()
    {
        W(_pic.Master, Data, 0xFF); // masked before init
        Init();

        Assert.Equal(0, R(_pic.Master, Data));
        _pic.Irq(1).Pulse();
        Assert.True(_intr.Level);
        Assert.Equal(0x21, _pic.Acknowledge());

        W(_pic.Master, Command, NonSpecificEoi);
        _pic.Irq(14).Pulse();
        Assert.Equal(0x2E, _pic.Acknowledge());
    }

    [Fact]
    public void Acknowledge_during_initialisation_answers_nothing()
    {
        W(_pic.Master, Command, 0x11);
        W(_pic.Master, Data, 0x20);

        Assert.Null(_pic.Acknowledge());
    }

    [Fact]
    public void Imr_masks_a_request_until_it_is_unmasked()
    {
        Init();
        W(_pic.Master, Data, 0b0000_0010);

        _pic.Irq(1).Pulse();
        Assert.False(_intr.Level);

        W(_pic.Master, Data, 0);
        Assert.True(_intr.Level);
        Assert.Equal(0x21, _pic.Acknowledge());
    }

    [Fact]
    public void Lower_irq_number_wins_and_a_lower_priority_request_waits_for_eoi()
    {
        Init();
        _pic.Irq(3).Pulse();
        _pic.Irq(1).Pulse();

        Assert.Equal(0x21, _pic.Acknowledge());
        Assert.False(_intr.Level); // IRQ 3 is below IRQ 1 in service

        W(_pic.Master, Command, NonSpecificEoi);
        Assert.True(_intr.Level);
        Assert.Equal(0x23, _pic.Acknowledge());
    }

    [Fact]
    public void Higher_priority_request_interrupts_a_lower_one_in_service()
    {
        Init();
        _pic.Irq(3).Pulse();
        Assert.Equal(0x23, _pic.Acknowledge());

        _pic.Irq(1).Pulse();

        Assert.True(_intr.Level);
        Assert.Equal(0x21, _pic.Acknowledge());
        Assert.Equal(0b0000_1010, Isr(_pic.Master));
    }

    [Fact]
    public void Acknowledge_moves_the_request_from_irr_to_isr()
    {
        Init();
        _pic.Irq(4).Pulse();
        Assert.Equal(0b0001_0000, R(_pic.Master, Command)); // IRR is read by default

        Assert.Equal(0x24, _pic.Acknowledge());

        Assert.Equal(0, R(_pic.Master, Command));
        Assert.Equal(0b0001_0000, Isr(_pic.Master));
        Assert.False(_intr.Level);
    }

    [Fact]
    public void Non_specific_eoi_clears_the_highest_priority_isr_bit()
    {
        Init();
        _pic.Irq(5).Pulse();
        _pic.Acknowledge();
        _pic.Irq(3).Pulse();
        _pic.Acknowledge();
        Assert.Equal(0b0010_1000, Isr(_pic.Master));

        W(_pic.Master, Command, NonSpecificEoi);

        Assert.Equal(0b0010_0000, Isr(_pic.Master));
    }

    [Fact]
    public void Specific_eoi_clears_the_named_isr_bit()
    {
        Init();
        _pic.Irq(5).Pulse();
        _pic.Acknowledge();
        _pic.Irq(3).Pulse();
        _pic.Acknowledge();

        W(_pic.Master, Command, 0x60 | 5);

        Assert.Equal(0b0000_1000, Isr(_pic.Master));
    }

    [Fact]
    public void Slave_irq_cascades_through_irq2_and_needs_eoi_on_both_chips()
    {
        Init();

        _pic.Irq(12).Pulse();
        Assert.True(_intr.Level);
        Assert.Equal(0x2C, _pic.Acknowledge());

        Assert.Equal(0b0000_0100, Isr(_pic.Master));
        Assert.Equal(0b0001_0000, Isr(_pic.Slave));

        _pic.Irq(9).Pulse(); // lower slave number: higher priority, but the master has IR2 in service
        Assert.False(_intr.Level);

        W(_pic.Slave, Command, NonSpecificEoi);
        W(_pic.Master, Command, NonSpecificEoi);
        Assert.True(_intr.Level);
        Assert.Equal(0x29, _pic.Acknowledge());
    }

    [Fact]
    public void Slave_mask_blocks_its_irq_but_not_the_master()
    {
        Init();
        W(_pic.Slave, Data, 0b0001_0000);

        _pic.Irq(12).Pulse();
        Assert.False(_intr.Level);

        _pic.Irq(6).Pulse();
        Assert.Equal(0x26, _pic.Acknowledge());
    }

    [Fact]
    public void Withdrawn_request_is_acknowledged_as_spurious_irq7_without_isr()
    {
        Init();
        W(_pic.Elcr, 0, 0b0010_0000); // IRQ 5 level-triggered
        _pic.Irq(5).Assert();
        Assert.True(_intr.Level);

        _pic.Irq(5).Deassert(); // gone before the INTA
        Assert.False(_intr.Level);

        Assert.Equal(0x27, _pic.Acknowledge());
        Assert.Equal(0, Isr(_pic.Master));
    }

    [Fact]
    public void Withdrawn_slave_request_is_acknowledged_as_spurious_irq15()
    {
        Init();
        W(_pic.Elcr, 1, 0b0000_0100); // IRQ 10 level-triggered
        _pic.Irq(10).Assert();
        _pic.Irq(10).Deassert(); // the master latched the cascade edge; the slave lost its request

        Assert.True(_intr.Level);
        Assert.Equal(0x2F, _pic.Acknowledge());
        Assert.Equal(0, Isr(_pic.Slave));
    }

    [Fact]
    public void Elcr_level_irq_requests_again_after_eoi_while_its_line_is_high()
    {
        Init();
        W(_pic.Elcr, 1, 0b0000_1000); // IRQ 11 level
        _pic.Irq(11).Assert();
        Assert.Equal(0x2B, _pic.Acknowledge());

        W(_pic.Slave, Command, NonSpecificEoi);
        W(_pic.Master, Command, NonSpecificEoi);

        Assert.True(_intr.Level);
        Assert.Equal(0x2B, _pic.Acknowledge());
    }

    [Fact]
    public void Edge_irq_held_high_does_not_request_again_after_eoi()
    {
        Init();
        _pic.Irq(11).Assert();
        Assert.Equal(0x2B, _pic.Acknowledge());

        W(_pic.Slave, Command, NonSpecificEoi);
        W(_pic.Master, Command, NonSpecificEoi);

        Assert.False(_intr.Level);
    }

    [Fact]
    public void Elcr_cannot_make_irq_0_1_2_8_or_13_level_triggered()
    {
        _pic.Elcr.Write(0, 2, 0xFFFF);

        Assert.Equal(0xF8, R(_pic.Elcr, 0));
        Assert.Equal(0xDE, R(_pic.Elcr, 1));
        Assert.Equal(0xDEF8UL, _pic.Elcr.Read(0, 2));
    }

    [Fact]
    public void Auto_eoi_leaves_isr_clear_so_lower_requests_follow_at_once()
    {
        Init(icw4: 0x03);
        _pic.Irq(1).Pulse();
        _pic.Irq(3).Pulse();

        Assert.Equal(0x21, _pic.Acknowledge());
        Assert.Equal(0, Isr(_pic.Master));
        Assert.True(_intr.Level);
        Assert.Equal(0x23, _pic.Acknowledge());
    }

    [Fact]
    public void Ocw3_selects_isr_or_irr_for_command_port_reads()
    {
        Init();
        _pic.Irq(6).Pulse();
        _pic.Acknowledge();
        _pic.Irq(7).Pulse();

        W(_pic.Master, Command, ReadIsr);
        Assert.Equal(0b0100_0000, R(_pic.Master, Command));
        Assert.Equal(0b0100_0000, R(_pic.Master, Command)); // the selection sticks

        W(_pic.Master, Command, ReadIrr);
        Assert.Equal(0b1000_0000, R(_pic.Master, Command));
    }

    [Fact]
    public void Poll_command_read_returns_and_acknowledges_the_highest_request()
    {
        Init();
        _pic.Irq(4).Pulse();

        W(_pic.Master, Command, Poll);
        Assert.Equal(0x84, R(_pic.Master, Command));

        Assert.Equal(0b0001_0000, Isr(_pic.Master));
        W(_pic.Master, Command, Poll);
        Assert.Equal(0, R(_pic.Master, Command)); // nothing left
    }

    [Fact]
    public void Set_priority_command_rotates_the_priority_order()
    {
        Init();
        W(_pic.Master, Command, 0xC0 | 3); // IR3 lowest: IR4 highest
        _pic.Irq(1).Pulse();
        _pic.Irq(5).Pulse();

        Assert.Equal(0x25, _pic.Acknowledge());
    }

    [Fact]
    public void Irq2_is_the_cascade_and_has_no_input()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => _pic.Irq(2));
        Assert.Throws<ArgumentOutOfRangeException>(() => _pic.Irq(16));
    }

    [Fact]
    public void Intr_is_told_only_on_changes()
    {
        Init();
        _pic.Irq(3).Pulse();
        _pic.Irq(4).Pulse();

        Assert.Equal(1, _intr.AssertCalls);
        Assert.Equal(0, _intr.DeassertCalls);
    }

    [Fact]
    public void Icw1_resets_masks_and_edge_requests()
    {
        Init();
        W(_pic.Master, Data, 0xF0);
        _pic.Irq(1).Pulse();
        W(_pic.Master, Data, 0xFF);

        Init();

        Assert.Equal(0, R(_pic.Master, Data));
        Assert.Equal(0, R(_pic.Master, Command)); // the latched edge was dropped
        Assert.False(_intr.Level);
    }

    [Fact]
    public void State_round_trip_keeps_requests_and_drives_intr()
    {
        Init();
        W(_pic.Elcr, 0, 0b0010_0000);
        _pic.Irq(5).Assert();
        _pic.Irq(12).Pulse();
        var state = _pic.State();

        var intr = new CountingInterruptLine();
        var restored = Pic8259Pair.FromState(state, intr);

        Assert.Equal(state, restored.State());
        Assert.True(intr.Level);
        Assert.Equal(0x2C, restored.Acknowledge()); // the cascade (IR2) outranks IRQ 5
        W(restored.Slave, Command, NonSpecificEoi);
        W(restored.Master, Command, NonSpecificEoi);
        Assert.Equal(0x25, restored.Acknowledge()); // the level IRQ 5 is still requesting
    }
}
