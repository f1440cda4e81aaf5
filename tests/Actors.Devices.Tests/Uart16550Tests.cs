namespace ActorVmm.Devices.Tests;

public sealed class Uart16550Tests
{
    private const ulong Rbr = 0, Thr = 0, Dll = 0, Ier = 1, Dlm = 1, Iir = 2, Fcr = 2, Lcr = 3, Mcr = 4, Lsr = 5, Msr = 6, Scr = 7;

    private const byte IerRda = 0x01, IerThre = 0x02, IerRls = 0x04, IerMs = 0x08;
    private const byte McrDtr = 0x01, McrRts = 0x02, McrOut1 = 0x04, McrOut2 = 0x08, McrLoop = 0x10;
    private const byte LsrDr = 0x01, LsrOe = 0x02, LsrThre = 0x20, LsrTemt = 0x40;
    private const byte IirNone = 0x01, IirRls = 0x06, IirRda = 0x04, IirTimeout = 0x0C, IirThre = 0x02, IirMs = 0x00;
    private const byte IirFifoBits = 0xC0;

    private readonly CountingInterruptLine _line = new();
    private readonly List<byte> _output = [];
    private readonly Uart16550 _uart;

    public Uart16550Tests() => _uart = new Uart16550(_line, _output.Add);

    private byte R(ulong offset) => (byte)_uart.Read(offset, 1);
    private void W(ulong offset, byte value) => _uart.Write(offset, 1, value);

    [Fact]
    public void Thr_write_reaches_the_output_at_once()
    {
        W(Thr, (byte)'h');
        W(Thr, (byte)'i');

        Assert.Equal("hi"u8.ToArray(), _output);
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));
    }

    [Fact]
    public void Lsr_after_reset_shows_an_idle_transmitter_and_no_data()
    {
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));
        Assert.Equal(IirNone, R(Iir));
        Assert.False(_line.Level);
    }

    [Fact]
    public void Lsr_data_ready_follows_the_receive_fifo()
    {
        _uart.OfferInput("x"u8);
        Assert.Equal(LsrDr | LsrThre | LsrTemt, R(Lsr));

        Assert.Equal((byte)'x', R(Rbr));
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));
    }

    [Fact]
    public void Thre_interrupt_is_raised_on_enable_and_cleared_by_reading_iir()
    {
        W(Mcr, McrOut2);
        W(Ier, IerThre);

        Assert.True(_line.Level);
        Assert.Equal(IirThre, R(Iir)); // this read is the acknowledgement
        Assert.False(_line.Level);
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Thr_write_rearms_thre_because_the_transmitter_finishes_at_once()
    {
        W(Mcr, McrOut2);
        W(Ier, IerThre);
        Assert.Equal(IirThre, R(Iir));
        Assert.False(_line.Level);

        W(Thr, (byte)'a');

        Assert.True(_line.Level);
        Assert.Equal(IirThre, R(Iir));
        Assert.False(_line.Level);
    }

    [Fact]
    public void Reenabling_etbei_raises_thre_again()
    {
        // Linux's UART_BUG_THRE probe: toggling IER.THRI must produce a fresh THRE interrupt.
        W(Ier, IerThre);
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirNone, R(Iir));

        W(Ier, 0);
        W(Ier, IerThre);

        Assert.Equal(IirThre, R(Iir));
    }

    [Fact]
    public void Disabling_etbei_drops_the_pending_thre()
    {
        W(Mcr, McrOut2);
        W(Ier, IerThre);
        Assert.True(_line.Level);

        W(Ier, 0);

        Assert.False(_line.Level);
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Received_data_interrupt_without_fifos_is_raised_and_cleared_by_reading_rbr()
    {
        W(Mcr, McrOut2);
        W(Ier, IerRda);
        Assert.False(_line.Level);

        Assert.Equal(1, _uart.OfferInput("z"u8));

        Assert.True(_line.Level);
        Assert.Equal(IirRda, R(Iir));
        Assert.True(_line.Level); // reading IIR does not clear received data
        Assert.Equal((byte)'z', R(Rbr));
        Assert.False(_line.Level);
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Character_timeout_is_reported_below_the_trigger_level()
    {
        W(Mcr, McrOut2);
        W(Fcr, 0x81); // FIFOs on, trigger 8
        W(Ier, IerRda);

        _uart.OfferInput("abc"u8);

        Assert.True(_line.Level);
        Assert.Equal(IirFifoBits | IirTimeout, R(Iir));
        Assert.Equal((byte)'a', R(Rbr));
        Assert.Equal((byte)'b', R(Rbr));
        Assert.Equal(IirFifoBits | IirTimeout, R(Iir));
        Assert.Equal((byte)'c', R(Rbr));
        Assert.False(_line.Level);
        Assert.Equal(IirFifoBits | IirNone, R(Iir));
    }

    [Theory]
    [InlineData(0x01, 1)]
    [InlineData(0x41, 4)]
    [InlineData(0x81, 8)]
    [InlineData(0xC1, 14)]
    public void Received_data_interrupt_fires_at_the_trigger_level(int fcr, int level)
    {
        W(Fcr, (byte)fcr);
        W(Ier, IerRda);

        _uart.OfferInput(new byte[level - 1]);
        var below = R(Iir);
        _uart.OfferInput(new byte[1]);
        var at = R(Iir);

        Assert.Equal(level == 1 ? IirFifoBits | IirNone : IirFifoBits | IirTimeout, below);
        Assert.Equal(IirFifoBits | IirRda, at);
    }

    [Fact]
    public void Iir_fifo_bits_follow_fcr_enable()
    {
        Assert.Equal(IirNone, R(Iir));
        W(Fcr, 0x01);
        Assert.Equal(IirFifoBits | IirNone, R(Iir));
        W(Fcr, 0x00);
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Fifo_takes_sixteen_bytes_and_refuses_the_seventeenth()
    {
        W(Fcr, 0x01);
        var input = Enumerable.Range(1, 20).Select(i => (byte)i).ToArray();

        Assert.Equal(16, _uart.OfferInput(input));
        Assert.Equal(0, _uart.OfferInput(input.AsSpan(16)));

        Assert.Equal(1, R(Rbr));
        Assert.Equal(1, _uart.OfferInput(input.AsSpan(16)));
        Assert.Equal(0, _uart.OfferInput(input.AsSpan(17)));

        var read = Enumerable.Range(0, 16).Select(_ => R(Rbr)).ToArray();
        Assert.Equal(input[1..17], read);
        Assert.Equal(0, R(Lsr) & LsrDr);
    }

    [Fact]
    public void Without_fifos_the_receiver_holds_one_byte()
    {
        Assert.Equal(1, _uart.OfferInput("abc"u8));
        Assert.Equal(0, _uart.OfferInput("bc"u8));
        Assert.Equal((byte)'a', R(Rbr));
        Assert.Equal(1, _uart.OfferInput("bc"u8));
    }

    [Fact]
    public void Fcr_clear_rx_empties_the_fifo()
    {
        W(Fcr, 0x01);
        _uart.OfferInput("abcd"u8);

        W(Fcr, 0x03);

        Assert.Equal(0, R(Lsr) & LsrDr);
        Assert.Equal(16, _uart.OfferInput(new byte[20]));
    }

    [Fact]
    public void Divisor_latch_is_readable_and_writable_with_dlab()
    {
        W(Ier, IerRda);
        W(Lcr, 0x83); // DLAB, 8N1
        Assert.Equal(12, R(Dll)); // power-on divisor, 9600 baud
        Assert.Equal(0, R(Dlm));

        W(Dll, 0x01);
        W(Dlm, 0x02);
        Assert.Equal(0x01, R(Dll));
        Assert.Equal(0x02, R(Dlm));
        Assert.Empty(_output); // a DLL write is not a transmission

        W(Lcr, 0x03);
        Assert.Equal(0x03, R(Lcr));
        Assert.Equal(IerRda, R(Ier)); // IER kept apart from DLM
        W(Lcr, 0x83);
        Assert.Equal(0x01, R(Dll));
        Assert.Equal(0x02, R(Dlm));
    }

    [Fact]
    public void Scratch_register_holds_a_byte()
    {
        W(Scr, 0xA5);
        Assert.Equal(0xA5, R(Scr));
        W(Scr, 0x5A);
        Assert.Equal(0x5A, R(Scr));
    }

    [Fact]
    public void Wide_accesses_use_the_low_byte()
    {
        _uart.Write(Scr, 4, 0x1234_5678);
        Assert.Equal(0x78UL, _uart.Read(Scr, 4));
    }

    [Fact]
    public void Loopback_sends_transmitted_bytes_to_the_receiver_not_the_output()
    {
        W(Fcr, 0x01);
        W(Mcr, McrLoop);

        W(Thr, 0x42);
        W(Thr, 0x43);

        Assert.Empty(_output);
        Assert.Equal(LsrDr | LsrThre | LsrTemt, R(Lsr));
        Assert.Equal(0x42, R(Rbr));
        Assert.Equal(0x43, R(Rbr));
    }

    [Fact]
    public void Loopback_disconnects_host_input()
    {
        W(Mcr, McrLoop);
        Assert.Equal(0, _uart.OfferInput("a"u8));
        W(Mcr, 0);
        Assert.Equal(1, _uart.OfferInput("a"u8));
    }

    [Fact]
    public void Loopback_into_a_full_fifo_overruns_and_raises_line_status_first()
    {
        W(Mcr, McrLoop | McrOut2);
        W(Fcr, 0x01);
        W(Ier, IerRda | IerRls);

        for (var i = 0; i < 17; i++) W(Thr, (byte)i);

        Assert.True(_line.Level);
        Assert.Equal(IirFifoBits | IirRls, R(Iir)); // outranks received data
        Assert.Equal(LsrDr | LsrOe | LsrThre | LsrTemt, R(Lsr));
        Assert.Equal(LsrDr | LsrThre | LsrTemt, R(Lsr)); // OE cleared by the read
        Assert.Equal(IirFifoBits | IirRda, R(Iir));

        var read = Enumerable.Range(0, 16).Select(_ => R(Rbr)).ToArray();
        Assert.Equal(Enumerable.Range(0, 16).Select(i => (byte)i), read); // the 17th was lost
        Assert.False(_line.Level);
    }

    [Fact]
    public void Loopback_without_fifos_overruns_on_the_second_byte_and_keeps_the_newest()
    {
        W(Mcr, McrLoop);
        W(Thr, 1);
        Assert.Equal(LsrDr | LsrThre | LsrTemt, R(Lsr));

        W(Thr, 2);

        Assert.Equal(LsrDr | LsrOe | LsrThre | LsrTemt, R(Lsr));
        Assert.Equal(2, R(Rbr));
    }

    [Fact]
    public void Msr_reflects_mcr_in_loopback_with_delta_bits()
    {
        Assert.Equal(0xB0, R(Msr)); // host side: DCD, DSR, CTS

        W(Mcr, McrLoop);
        Assert.Equal(0x0B, R(Msr)); // all lines dropped: DDCD, DDSR, DCTS
        Assert.Equal(0x00, R(Msr)); // deltas cleared by the read

        W(Mcr, McrLoop | McrDtr | McrRts | McrOut1 | McrOut2);
        Assert.Equal(0xFB, R(Msr));

        W(Mcr, McrLoop | McrDtr | McrRts | McrOut2);
        Assert.Equal(0xB4, R(Msr)); // RI trailing edge

        W(Mcr, McrLoop | McrRts);
        Assert.Equal(0x1A, R(Msr)); // CTS kept; DSR and DCD dropped
    }

    [Fact]
    public void Modem_status_interrupt_has_the_lowest_priority_and_clears_on_msr_read()
    {
        W(Mcr, McrLoop | McrOut2);
        W(Ier, IerMs | IerThre);
        W(Mcr, McrLoop | McrOut2 | McrRts); // DCTS

        Assert.True(_line.Level);
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirMs, R(Iir));
        Assert.True(_line.Level);

        R(Msr);

        Assert.False(_line.Level);
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Received_data_outranks_thre()
    {
        W(Ier, IerRda | IerThre);
        _uart.OfferInput("q"u8);

        Assert.Equal(IirRda, R(Iir));
        Assert.Equal(IirRda, R(Iir)); // THRE was not the reported source, so it stays pending
        R(Rbr);
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirNone, R(Iir));
    }

    [Fact]
    public void Out2_gates_the_interrupt_line()
    {
        W(Ier, IerRda);
        _uart.OfferInput("q"u8);

        Assert.Equal(IirRda, R(Iir));
        Assert.False(_line.Level);

        W(Mcr, McrOut2);
        Assert.True(_line.Level);

        W(Mcr, 0);
        Assert.False(_line.Level);
    }

    [Fact]
    public void Line_is_told_only_on_changes()
    {
        W(Mcr, McrOut2);
        W(Fcr, 0x01);
        W(Ier, IerRda);

        _uart.OfferInput("a"u8);
        _uart.OfferInput("b"u8);
        R(Iir);
        R(Lsr);
        W(Scr, 1);
        R(Rbr);
        R(Rbr);
        R(Rbr);
        R(Iir);

        Assert.Equal(1, _line.AssertCalls);
        Assert.Equal(1, _line.DeassertCalls);
        Assert.False(_line.Level);
    }

    [Fact]
    public void State_round_trip_keeps_registers_fifo_and_interrupt_level()
    {
        W(Lcr, 0x80);
        W(Dll, 0x03);
        W(Dlm, 0x00);
        W(Lcr, 0x1B);
        W(Fcr, 0x41); // trigger 4
        W(Mcr, McrOut2 | McrDtr);
        W(Scr, 0x77);
        W(Ier, IerRda | IerThre);
        _uart.OfferInput("hello"u8);
        Assert.True(_line.Level);

        var state = _uart.State();
        var line = new CountingInterruptLine();
        var output = new List<byte>();
        var restored = Uart16550.FromState(state, line, output.Add);

        Assert.Equal(state, restored.State());
        Assert.Equal("hello"u8.ToArray(), state.RxFifo.ToArray());
        Assert.True(line.Level);
        Assert.Equal(1, line.AssertCalls);

        // Both behave the same from here on.
        foreach (var uart in new[] { _uart, restored })
        {
            Assert.Equal(0x03UL, uart.Read(Lcr, 1) & 0x03);
            Assert.Equal(IirFifoBits | IirRda, (byte)uart.Read(Iir, 1));
            Assert.Equal("hello"u8.ToArray(), Enumerable.Range(0, 5).Select(_ => (byte)uart.Read(Rbr, 1)).ToArray());
            Assert.Equal(IirFifoBits | IirThre, (byte)uart.Read(Iir, 1));
            Assert.Equal(IirFifoBits | IirNone, (byte)uart.Read(Iir, 1));
            Assert.Equal(0x77UL, uart.Read(Scr, 1));
            uart.Write(Lcr, 1, 0x9B);
            Assert.Equal(0x03UL, uart.Read(Dll, 1));
        }
        Assert.False(_line.Level);
        Assert.False(line.Level);
        Assert.Equal(_uart.State(), restored.State());
    }

    [Fact]
    public void Restoring_a_quiet_state_drives_the_line_low()
    {
        var line = new CountingInterruptLine();
        line.Assert(); // whatever the line was doing before the restore

        Uart16550.FromState(_uart.State(), line, _ => { });

        Assert.False(line.Level);
        Assert.Equal(1, line.DeassertCalls);
    }

    [Fact]
    public void Restoring_a_fifo_larger_than_the_receiver_is_rejected()
    {
        var state = _uart.State() with { RxFifo = [1, 2] }; // FIFOs disabled: capacity 1

        Assert.Throws<ArgumentException>(() => Uart16550.FromState(state, new CountingInterruptLine(), _ => { }));
    }

    [Fact]
    public void Restored_overrun_is_still_reported()
    {
        W(Mcr, McrLoop | McrOut2);
        W(Ier, IerRls);
        W(Thr, 1);
        W(Thr, 2);

        var line = new CountingInterruptLine();
        var restored = Uart16550.FromState(_uart.State(), line, _ => { });

        Assert.True(line.Level);
        Assert.Equal(IirRls, (byte)restored.Read(Iir, 1));
        Assert.Equal(LsrDr | LsrOe | LsrThre | LsrTemt, (byte)restored.Read(Lsr, 1));
        Assert.False(line.Level);
    }
}
