using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.LibVmm.Tests;

/// <summary>Tiny 16-bit real-mode guests, assembled with Iced, loaded at <see cref="CodeAddress"/>.</summary>
internal static class TestGuests
{
    public const ulong CodeAddress = 0x1000;
    public const byte OutPort = 0x10, OutPort2 = 0x11, InPort = 0x20;
    public const ushort MmioSegment = 0x2000; // base 0x20000: beyond a 64 KiB RAM
    public const ulong MmioWriteAddress = 0x2_0010, MmioReadAddress = 0x2_0011;
    public const ulong StoreAddress = 0x3000;

    public static byte[] Assemble(Action<Assembler> emit)
    {
        var a = new Assembler(16);
        emit(a);
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), CodeAddress);
        return stream.ToArray();
    }

    /// <summary>mov al, 0x41; out 0x10, al; hlt</summary>
    public static byte[] OutThenHlt() => Assemble(a =>
    {
        a.mov(al, (byte)0x41);
        a.@out(OutPort, al);
        a.hlt();
    });

    /// <summary>in al, 0x20; out 0x11, al; hlt — echoes what the VMM supplies.</summary>
    public static byte[] Echo() => Assemble(a =>
    {
        a.@in(al, InPort);
        a.@out(OutPort2, al);
        a.hlt();
    });

    /// <summary>A byte store to, then a load from, addresses outside RAM; outputs the loaded byte.</summary>
    public static byte[] MmioWriteRead() => Assemble(a =>
    {
        a.mov(ax, MmioSegment);
        a.mov(ds, ax);
        a.mov(__byte_ptr[(long)(MmioWriteAddress - ((ulong)MmioSegment << 4))], 0x99);
        a.mov(al, __byte_ptr[(long)(MmioReadAddress - ((ulong)MmioSegment << 4))]);
        a.@out(OutPort, al);
        a.hlt();
    });

    /// <summary>mov byte [0x3000], 0x7E; hlt</summary>
    public static byte[] StoreThenHlt() => Assemble(a =>
    {
        a.mov(__byte_ptr[(long)StoreAddress], 0x7E);
        a.hlt();
    });

    /// <summary>jmp $ — runs until kicked.</summary>
    public static byte[] Spin() => Assemble(a =>
    {
        var spin = a.CreateLabel();
        a.Label(ref spin);
        a.jmp(spin);
    });

    /// <summary>CPUID leaf 1, then out ECX to port 0x10 and EBX to port 0x11 (dwords); hlt.</summary>
    public static byte[] Cpuid1() => Assemble(a =>
    {
        a.mov(eax, 1u);
        a.xor(ecx, ecx);
        a.cpuid();
        a.mov(eax, ecx);
        a.@out(OutPort, eax);
        a.mov(eax, ebx);
        a.@out(OutPort2, eax);
        a.hlt();
    });
}

/// <summary>The guests are 16-bit code as intended (no 32-bit addressing slipped in). Runs without KVM.</summary>
public sealed class TestGuestTests
{
    [Fact]
    public void Test_guests_assemble_to_the_expected_16_bit_code()
    {
        Assert.Equal(Convert.FromHexString("B041" + "E610" + "F4"), TestGuests.OutThenHlt());
        Assert.Equal(Convert.FromHexString("E420" + "E611" + "F4"), TestGuests.Echo());
        Assert.Equal(Convert.FromHexString("B80020" + "8ED8" + "C606100099" + "A01100" + "E610" + "F4"), TestGuests.MmioWriteRead());
        Assert.Equal(Convert.FromHexString("C60600307E" + "F4"), TestGuests.StoreThenHlt());
        Assert.Equal(Convert.FromHexString("EBFE"), TestGuests.Spin());
        Assert.Equal(Convert.FromHexString("66B801000000" + "6631C9" + "0FA2" + "6689C8" + "66E710" + "6689D8" + "66E711" + "F4"), TestGuests.Cpuid1());
    }
}
