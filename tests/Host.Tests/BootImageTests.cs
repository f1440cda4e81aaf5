using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Iced.Intel;

namespace ActorVmm.Host.Tests;

public sealed class BootImageTests : IDisposable
{
    private const ulong MiB = 1 << 20;

    private const ulong Present = 0b0000_0001;
    private const ulong Writable = 0b0000_0010;
    private const ulong PageSize2M = 0b1000_0000;
    private const ulong AddressMask = 0x000F_FFFF_FFFF_F000;

    private readonly GuestMemoryMap _memory = VmspaceLayout.Build(16 * MiB);

    public void Dispose() => _memory.Dispose();

    /// <summary>A vcpu's special registers before the loader's function is applied: deliberately not real mode.</summary>
    private static readonly SpecialRegisterState Before = new(
        SegmentState.Flat32(0x28, code: true), SegmentState.Flat32(0x30, code: false), SegmentState.Flat32(0x30, code: false),
        SegmentState.Flat32(0x30, code: false), SegmentState.Flat32(0x30, code: false), SegmentState.Flat32(0x30, code: false),
        SegmentState.Flat32(0x40, code: false) with { System = false, Type = 0xB },
        SegmentState.Flat32(0, code: false) with { Unusable = true },
        new TableState(0x5000, 0x27), new TableState(0x6000, 0xFFF),
        Cr0: SpecialRegisterState.Cr0Et, Cr2: 0x1234, Cr3: 0, Cr4: 0, Cr8: 0, Efer: 0, ApicBase: 0xFEE0_0900);

    private byte[] ReadGuest(ulong address, int length)
    {
        var bytes = new byte[length];
        _memory.Read(new GuestPhysAddr(address), bytes);
        return bytes;
    }

    // ---- FlatImage ----

    [Fact]
    public void FlatImage_writes_the_image_at_its_load_address()
    {
        byte[] image = [0xFA, 0xF4, 0xEB, 0xFD];
        new FlatImage(image, 0x7C00, 0, 0x7C00).Load(_memory);
        Assert.Equal(image, ReadGuest(0x7C00, image.Length));
        Assert.Equal(new byte[4], ReadGuest(0x7C00 + 4, 4));
    }

    [Fact]
    public void FlatImage_enters_real_mode_at_cs_ip()
    {
        var state = new FlatImage([0xF4], 0x7C00, 0, 0x7C00).Load(_memory);
        Assert.NotNull(state.Registers);
        Assert.Equal(0x7C00UL, state.Registers!.Rip);
        Assert.Equal(0x2UL, state.Registers.Rflags & 0x2);

        var s = state.Special!(Before);
        Assert.Equal(0, s.Cs.Selector);
        Assert.Equal(0UL, s.Cs.Base);
        Assert.Equal(0xFFFFu, s.Cs.Limit);
        Assert.False(s.Cs.DefaultBig);
        Assert.False(s.Cs.Long);
        Assert.False(s.Cs.Granularity);
        Assert.Equal(16, s.CodeBitness);
    }

    [Fact]
    public void FlatImage_above_64K_uses_a_segment_base_of_cs_times_16()
    {
        var (cs, ip) = FlatImage.DefaultEntry(0x12345);
        Assert.Equal(((ushort)0x1234, (ushort)0x5), (cs, ip));
        var state = new FlatImage([0xF4], 0x12345, cs, ip).Load(_memory);
        Assert.Equal(0xF4, ReadGuest(0x12345, 1)[0]);

        Assert.Equal(5UL, state.Registers!.Rip);
        var s = state.Special!(Before);
        foreach (var seg in new[] { s.Cs, s.Ds, s.Es, s.Ss })
        {
            Assert.Equal(0x1234, seg.Selector);
            Assert.Equal(0x12340UL, seg.Base);
            Assert.True(seg.Present);
        }
        Assert.Equal(0UL, s.Fs.Base);
        Assert.Equal(0UL, s.Gs.Base);
        Assert.Equal(0xBu, s.Cs.Type);  // execute/read, accessed
        Assert.Equal(0x3u, s.Ds.Type);  // read/write, accessed
        // The linear address of CS:IP is the load address.
        Assert.Equal(0x12345UL, s.Cs.Base + state.Registers.Rip);
        // What the loader does not own is kept.
        Assert.Equal(Before.Cr0, s.Cr0);
        Assert.Equal(Before.Gdt, s.Gdt);
        Assert.Equal(Before.ApicBase, s.ApicBase);
    }

    [Fact]
    public void FlatImage_must_load_below_1M()
    {
        var e = Assert.Throws<BootException>(() => new FlatImage([0xF4], 0x10_0000, 0xFFFF, 0x10).Load(_memory));
        Assert.Contains("below 1 MiB", e.Message);
    }

    [Fact]
    public void FlatImage_that_does_not_fit_in_ram_is_refused()
    {
        var e = Assert.Throws<BootException>(() => new FlatImage(new byte[16 * MiB], 0x7C00, 0, 0x7C00).Load(_memory));
        Assert.Contains("does not fit", e.Message);
    }

    [Fact]
    public void FlatImage_that_is_empty_is_refused() =>
        Assert.Contains("empty", Assert.Throws<BootException>(() => new FlatImage([], 0x7C00, 0, 0x7C00).Load(_memory)).Message);

    [Theory]
    [InlineData(0x7C00UL, 0, 0x7C00)]
    [InlineData(0xFFFFUL, 0, 0xFFFF)]
    [InlineData(0x10000UL, 0x1000, 0)]
    [InlineData(0x9FFF0UL, 0x9FFF, 0)]
    public void DefaultEntry_reaches_the_load_address(ulong address, int cs, int ip)
    {
        var (c, i) = FlatImage.DefaultEntry(address);
        Assert.Equal(((ushort)cs, (ushort)ip), (c, i));
        Assert.Equal(address, ((ulong)c << 4) + i);
    }

    // ---- FirmwareImage ----

    [Fact]
    public void FirmwareImage_refuses_empty_tiny_and_oversized_images()
    {
        Assert.Contains("empty", Assert.Throws<BootException>(() => new FirmwareImage([]).Firmware).Message);
        Assert.Contains("16 bytes", Assert.Throws<BootException>(() => new FirmwareImage(new byte[15]).Firmware).Message);
        Assert.Contains("at most", Assert.Throws<BootException>(() => new FirmwareImage(new byte[FirmwareImage.MaxSize + 1]).Firmware).Message);
    }

    [Fact]
    public void FirmwareImage_boots_from_the_reset_state()
    {
        var image = new byte[FirmwareImage.MaxSize];
        var firmware = new FirmwareImage(image);
        Assert.Same(image, firmware.Firmware);
        var state = firmware.Load(_memory);
        Assert.Null(state.Registers);
        Assert.Null(state.Special);
        Assert.Null(((BootImage)new FlatImage([1], 0x7C00, 0, 0x7C00)).Firmware);
    }

    // ---- LongModeImage ----

    private static ulong Walk(Func<ulong, ulong> read, ulong cr3, ulong linear, out ulong pde)
    {
        var pml4e = read((cr3 & AddressMask) + ((linear >> 39) & 511) * 8);
        Assert.Equal(Present | Writable, pml4e & (Present | Writable));
        var pdpte = read((pml4e & AddressMask) + ((linear >> 30) & 511) * 8);
        Assert.Equal(Present | Writable, pdpte & (Present | Writable));
        Assert.Equal(0UL, pdpte & PageSize2M); // not a 1 GiB page
        pde = read((pdpte & AddressMask) + ((linear >> 21) & 511) * 8);
        Assert.Equal(Present | Writable | PageSize2M, pde & (Present | Writable | PageSize2M));
        return (pde & 0x000F_FFFF_FFE0_0000) | (linear & 0x1F_FFFF);
    }

    [Fact]
    public void LongModeImage_writes_code_gdt_and_identity_page_tables()
    {
        byte[] code = [0xFA, 0xF4];
        new LongModeImage(code, 0x10_0000, 0x10_0000).Load(_memory);
        ulong Read64(ulong a) => _memory.ReadUInt64(new GuestPhysAddr(a));

        Assert.Equal(code, ReadGuest(0x10_0000, 2));

        // GDT at 0x1000: null, 64-bit code (L=1, D=0), data, 32-bit code (D=1).
        Assert.Equal(0UL, Read64(0x1000));
        var code64 = Read64(0x1000 + 8);
        Assert.Equal(1UL, (code64 >> 47) & 1);   // P
        Assert.Equal(1UL, (code64 >> 53) & 1);   // L
        Assert.Equal(0UL, (code64 >> 54) & 1);   // D
        Assert.Equal(0xAUL, (code64 >> 40) & 0xF); // execute/read
        var data = Read64(0x1000 + 16);
        Assert.Equal(1UL, (data >> 47) & 1);
        Assert.Equal(0x2UL, (data >> 40) & 0xF);  // read/write
        Assert.Equal(1UL, (Read64(0x1000 + 24) >> 54) & 1);

        // PML4[0] -> PDPT at 0x3000; PDPT[i] -> PD at 0x4000 + i * 0x1000.
        Assert.Equal(0x3000UL | Present | Writable, Read64(LongModeImage.Pml4Address));
        for (ulong i = 1; i < 512; i++) Assert.Equal(0UL, Read64(LongModeImage.Pml4Address + i * 8));
        for (ulong i = 0; i < 4; i++)
            Assert.Equal((0x4000 + i * 0x1000) | Present | Writable, Read64(LongModeImage.PdptAddress + i * 8));

        // Identity map with 2 MiB pages: RAM, the LAPIC in the MMIO hole, the start of the hole.
        foreach (var linear in new ulong[] { 0x0, 0x7C00, 0x10_0000, 0xC000_0000, 0xFEE0_0000, 0xFEE0_0030, 0xFFFF_FFFF })
        {
            var physical = Walk(Read64, LongModeImage.Pml4Address, linear, out var pde);
            Assert.Equal(linear, physical);
            Assert.Equal(linear & ~0x1F_FFFFUL, pde & AddressMask);
        }
        Assert.Equal(0x0UL | Present | Writable | PageSize2M, Read64(0x4000));
        Assert.Equal(0xC000_0000UL | Present | Writable | PageSize2M, Read64(0x7000));
        Assert.Equal(0xFEE0_0000UL | Present | Writable | PageSize2M, Read64(0x7000 + ((0xFEE0_0000UL >> 21) & 511) * 8));
    }

    [Fact]
    public void LongModeImage_enters_64_bit_mode_at_the_entry()
    {
        var state = new LongModeImage([0x90, 0x90, 0xF4], 0x10_0000, 0x10_0002).Load(_memory);
        Assert.Equal(0x10_0002UL, state.Registers!.Rip);
        Assert.Equal(LongModeImage.StackTop, state.Registers.Rsp);
        Assert.Equal(0x2UL, state.Registers.Rflags); // IF clear

        var s = state.Special!(Before);
        Assert.Equal(SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Pg, s.Cr0 & (SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Pg));
        Assert.NotEqual(0UL, s.Cr4 & SpecialRegisterState.Cr4Pae);
        Assert.Equal(SpecialRegisterState.EferLme | SpecialRegisterState.EferLma, s.Efer);
        Assert.Equal(LongModeImage.Pml4Address, s.Cr3);
        Assert.True(s.Cs.Long);
        Assert.False(s.Cs.DefaultBig);
        Assert.Equal(LongModeImage.CodeSelector, s.Cs.Selector);
        Assert.Equal(LongModeImage.DataSelector, s.Ss.Selector);
        Assert.Equal(new TableState(LongModeImage.GdtAddress, 31), s.Gdt);
        Assert.True(s.LongMode);
        Assert.Equal(64, s.CodeBitness);
    }

    [Theory]
    [InlineData(0x1000UL, 16)]
    [InlineData(0x7FF0UL, 16)]
    [InlineData(0x0F00UL, 0x200)]
    [InlineData(0x0UL, 0x8000)]
    public void LongModeImage_refuses_code_over_the_boot_structures(ulong address, int length)
    {
        var e = Assert.Throws<BootException>(() => new LongModeImage(new byte[length], address, address).Load(_memory));
        Assert.Contains("overlaps", e.Message);
    }

    [Fact]
    public void LongModeImage_accepts_code_just_below_and_just_above_the_boot_structures()
    {
        new LongModeImage(new byte[0x100], 0x0F00, 0x0F00).Load(_memory);
        new LongModeImage(new byte[0x100], 0x8000, 0x8000).Load(_memory);
    }

    [Theory]
    [InlineData(0x10_0000UL - 1)]
    [InlineData(0x10_0000UL + 4)]
    [InlineData(0UL)]
    public void LongModeImage_refuses_an_entry_outside_the_code(ulong entry)
    {
        var e = Assert.Throws<BootException>(() => new LongModeImage([1, 2, 3, 4], 0x10_0000, entry).Load(_memory));
        Assert.Contains("outside", e.Message);
    }

    [Fact]
    public void LongModeImage_refuses_code_past_the_end_of_ram() =>
        Assert.Contains("does not fit",
            Assert.Throws<BootException>(() => new LongModeImage(new byte[8], 16 * MiB - 4, 16 * MiB - 4).Load(_memory)).Message);

    // ---- DemoGuest ----

    [Fact]
    public void DemoGuest_is_64_bit_code_that_polls_writes_takes_the_uart_interrupt_and_halts()
    {
        var image = DemoGuest.Build();
        Assert.Equal(DemoGuest.LoadAddress, image.LoadAddress);
        Assert.Equal(image.LoadAddress, image.Entry);

        // The code runs up to the handler's iretq; the strings follow it.
        var decoder = Iced.Intel.Decoder.Create(64, new ByteArrayCodeReader(image.Code));
        decoder.IP = image.LoadAddress;
        var formatter = new NasmFormatter();
        var text = new List<string>();
        var instructions = new List<Instruction>();
        while (decoder.IP < image.LoadAddress + (ulong)image.Code.Length)
        {
            decoder.Decode(out var instruction);
            Assert.False(instruction.IsInvalid, $"invalid instruction at 0x{instruction.IP:X}");
            instructions.Add(instruction);
            var output = new StringOutput();
            formatter.Format(instruction, output);
            text.Add(output.ToStringAndReset());
            if (instruction.Mnemonic == Mnemonic.Iretq) break;
        }
        Assert.Equal("iretq", text[^1]);
        foreach (var expected in new[] { "lidt [rdi]", "in al,dx", "out dx,al", "sti", "cli", "hlt", "mov dx,3FDh", "mov dx,3F8h", "mov dx,3F9h", "mov dx,3FAh" })
            Assert.Contains(expected, text);

        // Two RSI-relative string pointers: the greeting, then the line printed after the interrupt.
        var strings = instructions.Where(i => i.Mnemonic == Mnemonic.Lea && i.Op0Register == Register.RSI && i.IsIPRelativeMemoryOperand)
            .Select(i => (int)(i.IPRelativeMemoryAddress - image.LoadAddress)).ToArray();
        Assert.Equal(2, strings.Length);
        var greeting = Encoding.ASCII.GetBytes(DemoGuest.Greeting + "\0");
        var after = Encoding.ASCII.GetBytes(DemoGuest.AfterInterrupt + "\0");
        Assert.Equal(greeting, image.Code.AsSpan(strings[0], greeting.Length).ToArray());
        Assert.Equal(after, image.Code.AsSpan(strings[1], after.Length).ToArray());
    }

    [Fact]
    public void DemoGuest_loads_into_a_16M_guest()
    {
        var image = DemoGuest.Build("hi\n");
        var state = image.Load(_memory);
        Assert.Equal(image.Code, ReadGuest(DemoGuest.LoadAddress, image.Code.Length));
        Assert.Equal(DemoGuest.LoadAddress, state.Registers!.Rip);
        Assert.True(state.Special!(Before).LongMode);
    }
}
