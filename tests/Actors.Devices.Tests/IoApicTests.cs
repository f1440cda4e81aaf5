namespace ActorVmm.Devices.Tests;

public sealed class IoApicTests
{
    private const byte Id = 0x00, Ver = 0x01, Arb = 0x02;
    private const uint Masked = 1u << 16, Level = 1u << 15, RemoteIrr = 1u << 14, ActiveLow = 1u << 13, Logical = 1u << 11;

    private sealed class RecordingBus : IApicBus
    {
        public List<ApicMessage> Messages { get; } = [];
        public void Deliver(ApicMessage m) => Messages.Add(m);
    }

    private readonly RecordingBus _bus = new();
    private readonly IoApic _ioapic;

    public IoApicTests() => _ioapic = new IoApic(_bus, id: 3);

    private uint R(byte register)
    {
        _ioapic.Write(IoApic.RegisterSelectOffset, 4, register);
        return (uint)_ioapic.Read(IoApic.WindowOffset, 4);
    }

    private void W(byte register, uint value)
    {
        _ioapic.Write(IoApic.RegisterSelectOffset, 4, register);
        _ioapic.Write(IoApic.WindowOffset, 4, value);
    }

    private static byte Low(int pin) => (byte)(0x10 + 2 * pin);
    private static byte High(int pin) => (byte)(0x11 + 2 * pin);

    /// <summary>Programs <paramref name="pin"/>: low dword flags + vector, destination in bits 63:56.</summary>
    private void Program(int pin, uint low, byte destination = 0)
    {
        W(High(pin), (uint)destination << 24);
        W(Low(pin), low);
    }

    [Fact]
    public void Version_register_reads_version_0x20_and_23_as_the_highest_entry()
    {
        Assert.Equal(0x0017_0020u, R(Ver));

        W(Ver, 0);
        Assert.Equal(0x0017_0020u, R(Ver)); // read-only
    }

    [Fact]
    public void Id_lives_in_bits_27_to_24_and_arbitration_id_follows_it()
    {
        Assert.Equal(3u << 24, R(Id));

        W(Id, 0xFFFF_FFFF);

        Assert.Equal(0x0F00_0000u, R(Id));
        Assert.Equal(0x0F00_0000u, R(Arb));
    }

    [Fact]
    public void Ioregsel_reads_back()
    {
        _ioapic.Write(IoApic.RegisterSelectOffset, 4, 0x21);
        Assert.Equal(0x21UL, _ioapic.Read(IoApic.RegisterSelectOffset, 4));
    }

    [Fact]
    public void Redirection_entries_come_out_of_reset_masked()
    {
        for (var pin = 0; pin < IoApic.Pins; pin++)
        {
            Assert.Equal(Masked, R(Low(pin)));
            Assert.Equal(0u, R(High(pin)));
        }
    }

    [Fact]
    public void Redirection_entry_keeps_writable_bits_and_ignores_writes_to_delivery_status_and_remote_irr()
    {
        W(Low(7), 0xFFFF_FFFF);
        W(High(7), 0xFFFF_FFFF);

        // vector, delivery mode, destination mode, polarity, trigger, mask; not bits 12 and 14.
        Assert.Equal(0x0001_AFFFu, R(Low(7)));
        Assert.Equal(0xFF00_0000u, R(High(7)));
    }

    [Fact]
    public void Edge_pin_delivers_once_per_rising_edge()
    {
        Program(4, 0x31, destination: 1);
        var pin = _ioapic.Pin(4);

        pin.Assert();
        pin.Assert(); // no edge
        Assert.Single(_bus.Messages);

        pin.Deassert();
        Assert.Single(_bus.Messages);

        pin.Assert();
        pin.Deassert();
        pin.Pulse();
        Assert.Equal(3, _bus.Messages.Count);
        Assert.All(_bus.Messages, m => Assert.Equal(new ApicMessage(0x31, DeliveryMode.Fixed, false, 1, true, false), m));
    }

    [Fact]
    public void Level_pin_sets_remote_irr_and_does_not_deliver_again_until_eoi()
    {
        Program(9, Level | 0x49);
        var pin = _ioapic.Pin(9);

        pin.Assert();

        Assert.Single(_bus.Messages);
        Assert.True(_bus.Messages[0].LevelTriggered);
        Assert.Equal(RemoteIrr, R(Low(9)) & RemoteIrr);

        pin.Deassert();
        pin.Assert();
        Assert.Single(_bus.Messages); // remote IRR blocks it
    }

    [Fact]
    public void Level_pin_still_asserted_at_eoi_delivers_again()
    {
        Program(9, Level | 0x49);
        _ioapic.Pin(9).Assert();

        _ioapic.EndOfInterrupt(0x49);

        Assert.Equal(2, _bus.Messages.Count);
        Assert.Equal(RemoteIrr, R(Low(9)) & RemoteIrr);
    }

    [Fact]
    public void Eoi_register_clears_remote_irr_of_a_deasserted_level_pin_without_delivering()
    {
        Program(9, Level | 0x49);
        var pin = _ioapic.Pin(9);
        pin.Assert();
        pin.Deassert();

        _ioapic.Write(IoApic.EoiOffset, 4, 0x49);

        Assert.Single(_bus.Messages);
        Assert.Equal(0u, R(Low(9)) & RemoteIrr);

        pin.Assert();
        Assert.Equal(2, _bus.Messages.Count);
    }

    [Fact]
    public void Eoi_for_another_vector_leaves_remote_irr_set()
    {
        Program(9, Level | 0x49);
        _ioapic.Pin(9).Assert();

        _ioapic.EndOfInterrupt(0x50);

        Assert.Single(_bus.Messages);
        Assert.Equal(RemoteIrr, R(Low(9)) & RemoteIrr);
    }

    [Fact]
    public void Masked_level_pin_delivers_when_unmasked_while_still_asserted()
    {
        Program(10, Masked | Level | 0x52);
        _ioapic.Pin(10).Assert();
        Assert.Empty(_bus.Messages);

        W(Low(10), Level | 0x52);

        Assert.Single(_bus.Messages);
        Assert.Equal(0x52, _bus.Messages[0].Vector);
    }

    [Fact]
    public void Masked_edge_is_lost()
    {
        Program(3, Masked | 0x33);
        _ioapic.Pin(3).Pulse();

        W(Low(3), 0x33);

        Assert.Empty(_bus.Messages);
    }

    [Fact]
    public void Low_active_level_pin_is_active_while_its_line_is_low()
    {
        var pin = _ioapic.Pin(16);
        pin.Assert(); // line high: inactive for a low-active input
        Program(16, ActiveLow | Level | 0x60);
        Assert.Empty(_bus.Messages);

        pin.Deassert();

        Assert.Single(_bus.Messages);
        Assert.Equal(RemoteIrr, R(Low(16)) & RemoteIrr);
    }

    [Fact]
    public void Low_active_edge_pin_delivers_on_the_falling_edge()
    {
        var pin = _ioapic.Pin(5);
        pin.Assert();
        Program(5, ActiveLow | 0x35);

        pin.Deassert();
        Assert.Single(_bus.Messages);

        pin.Assert();
        Assert.Single(_bus.Messages);
    }

    [Fact]
    public void Vector_mode_and_logical_destination_pass_through_to_the_message()
    {
        Program(12, Logical | (1u << 8) | 0xA7, destination: 0x0F); // lowest priority, logical 0x0F

        _ioapic.Pin(12).Pulse();

        Assert.Equal(new ApicMessage(0xA7, DeliveryMode.LowestPriority, true, 0x0F, true, false), Assert.Single(_bus.Messages));
    }

    [Fact]
    public void Physical_destination_and_delivery_mode_pass_through_to_the_message()
    {
        Program(0, (7u << 8) | 0x00, destination: 0x02); // ExtINT to APIC 2

        _ioapic.Pin(0).Pulse();

        Assert.Equal(new ApicMessage(0, DeliveryMode.ExtInt, false, 2, true, false), Assert.Single(_bus.Messages));
    }

    [Fact]
    public void Only_32_bit_window_accesses_take_effect()
    {
        _ioapic.Write(IoApic.RegisterSelectOffset, 4, Ver);
        Assert.Equal(0UL, _ioapic.Read(IoApic.WindowOffset, 1));

        _ioapic.Write(IoApic.RegisterSelectOffset, 4, Low(1));
        _ioapic.Write(IoApic.WindowOffset, 2, 0x41);
        Assert.Equal(Masked, R(Low(1)));
    }

    [Fact]
    public void Switching_a_level_entry_to_edge_clears_remote_irr()
    {
        Program(9, Level | 0x49);
        _ioapic.Pin(9).Assert();

        W(Low(9), 0x49);

        Assert.Equal(0u, R(Low(9)) & RemoteIrr);
    }

    [Fact]
    public void Pin_outside_0_to_23_is_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => _ioapic.Pin(24));
        Assert.Throws<ArgumentOutOfRangeException>(() => _ioapic.Pin(-1));
    }

    [Fact]
    public void State_round_trip_keeps_remote_irr_and_pin_levels()
    {
        Program(9, Level | 0x49, destination: 4);
        _ioapic.Pin(9).Assert();
        var state = _ioapic.State();

        var bus = new RecordingBus();
        var restored = IoApic.FromState(state, bus);

        Assert.Equal(state, restored.State());
        Assert.Empty(bus.Messages); // nothing delivered by the restore
        restored.EndOfInterrupt(0x49); // still asserted: delivers again
        Assert.Equal(new ApicMessage(0x49, DeliveryMode.Fixed, false, 4, true, true), Assert.Single(bus.Messages));
    }
}
