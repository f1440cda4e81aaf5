using System.Buffers.Binary;
using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Xunit;

namespace ActorVmm.Host.Tests;

public sealed class MultibootTests
{
    private const uint KernelAddress = 0x10_0000;

    private static byte[] Kernel(uint flags = 0b11, uint bss = 0x100, int codeBytes = 64)
    {
        var segment = new byte[12 + codeBytes];
        TestElf.MultibootHeader(flags).CopyTo(segment, 0);
        for (var i = 12; i < segment.Length; i++) segment[i] = 0x90;
        return TestElf.Build(segment, KernelAddress, KernelAddress + 12, bss);
    }

    private static uint U32(GuestMemoryMap m, ulong a)
    {
        var b = new byte[4];
        m.Read(new GuestPhysAddr(a), b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static string CString(GuestMemoryMap m, ulong a)
    {
        var bytes = new List<byte>();
        var one = new byte[1];
        for (; ; a++)
        {
            m.Read(new GuestPhysAddr(a), one);
            if (one[0] == 0) return Encoding.UTF8.GetString(bytes.ToArray());
            bytes.Add(one[0]);
        }
    }

    private static SpecialRegisterState Apply(BootState boot)
    {
        var seg = new SegmentState(0, 0, 0xFFFF, 3, true, 0, false, true, false, false, false);
        var initial = new SpecialRegisterState(seg, seg, seg, seg, seg, seg, seg, seg, new TableState(0, 0xFFFF),
            new TableState(0, 0xFFFF), 0x10, 0, 0, 0, 0, 0, 0xFEE0_0900);
        return boot.Special!(initial);
    }

    [Fact]
    public void A_multiboot_elf_kernel_is_loaded_and_entered_in_32_bit_protected_mode_with_the_magic()
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        var kernel = Kernel();
        var boot = new MultibootImage(kernel, "kernel console=ttyS0", []).Load(memory);

        Assert.Equal(MultibootImage.BootloaderMagic, boot.Registers!.Rax);
        Assert.Equal(MultibootImage.InfoAddress, boot.Registers.Rbx);
        Assert.Equal(KernelAddress + 12UL, boot.Registers.Rip);
        Assert.Equal(0x2UL, boot.Registers.Rflags); // IF clear
        var s = Apply(boot);
        Assert.True(s.ProtectedMode);
        Assert.Equal(0UL, s.Cr0 & SpecialRegisterState.Cr0Pg);
        Assert.Equal(32, s.CodeBitness);
        Assert.Equal(0xFFFF_FFFFu, s.Ds.Limit);

        var loaded = new byte[12 + 64];
        memory.Read(new GuestPhysAddr(KernelAddress), loaded);
        Assert.Equal(kernel.AsSpan(TestElf.SegmentOffset).ToArray(), loaded);
        var bss = new byte[0x100];
        memory.Read(new GuestPhysAddr(KernelAddress + 76), bss);
        Assert.All(bss, b => Assert.Equal(0, b));
    }

    [Fact]
    public void The_information_structure_has_memory_command_line_memory_map_and_loader_name()
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        new MultibootImage(Kernel(), "kernel quiet", []).Load(memory);
        var info = MultibootImage.InfoAddress;

        var flags = U32(memory, info);
        Assert.Equal(MultibootImage.InfoMemory | MultibootImage.InfoCommandLine | MultibootImage.InfoMemoryMap | MultibootImage.InfoLoaderName, flags);
        Assert.Equal(639u, U32(memory, info + 4));            // mem_lower KiB (below the EBDA)
        Assert.Equal(15u * 1024, U32(memory, info + 8));      // mem_upper KiB above 1 MiB
        Assert.Equal("kernel quiet", CString(memory, U32(memory, info + 16)));
        Assert.Equal("ActorVmm", CString(memory, U32(memory, info + 64)));

        var length = U32(memory, info + 44);
        var address = U32(memory, info + 48);
        var entries = new List<(ulong Base, ulong Length, uint Type)>();
        for (var at = address; at < address + length; at += 24)
        {
            Assert.Equal(20u, U32(memory, at));
            var e = new byte[20];
            memory.Read(new GuestPhysAddr(at + 4), e);
            entries.Add((BinaryPrimitives.ReadUInt64LittleEndian(e), BinaryPrimitives.ReadUInt64LittleEndian(e.AsSpan(8)),
                BinaryPrimitives.ReadUInt32LittleEndian(e.AsSpan(16))));
        }
        Assert.Contains((0UL, 0x9FC00UL, 1u), entries);
        Assert.Contains((0x10_0000UL, 15UL << 20, 1u), entries);
        Assert.Contains(entries, e => e.Type == 2 && e.Base == 0xF0000);
        Assert.Equal(entries.OrderBy(e => e.Base).ToList(), entries);
    }

    [Fact]
    public void Modules_follow_the_kernel_page_aligned_with_their_strings()
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        var first = Encoding.ASCII.GetBytes("initrd contents");
        var second = new byte[5000];
        new Random(7).NextBytes(second);
        new MultibootImage(Kernel(), "k", [new MultibootModule(first, "initrd.img"), new MultibootModule(second, "two arg")]).Load(memory);
        var info = MultibootImage.InfoAddress;

        Assert.NotEqual(0u, U32(memory, info) & MultibootImage.InfoModules);
        Assert.Equal(2u, U32(memory, info + 20));
        var list = U32(memory, info + 24);
        var (start1, end1) = (U32(memory, list), U32(memory, list + 4));
        var (start2, end2) = (U32(memory, list + 16), U32(memory, list + 20));
        Assert.Equal(0u, start1 % 4096);
        Assert.True(start1 >= KernelAddress + 76 + 0x100, "module 1 must not overlap the kernel or its bss");
        Assert.Equal(first.Length, (int)(end1 - start1));
        Assert.Equal(0u, start2 % 4096);
        Assert.True(start2 >= end1);
        Assert.Equal(second.Length, (int)(end2 - start2));
        var read = new byte[second.Length];
        memory.Read(new GuestPhysAddr(start2), read);
        Assert.Equal(second, read);
        Assert.Equal("initrd.img", CString(memory, U32(memory, list + 8)));
        Assert.Equal("two arg", CString(memory, U32(memory, list + 24)));
    }

    [Fact]
    public void The_address_fields_of_the_header_place_a_non_elf_kernel()
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        // A flat file with the header at 0 and flag 16: header_addr = load_addr = 0x200000.
        var file = new byte[64];
        var flags = 0b11u | MultibootImage.FlagAddressFields;
        TestElf.MultibootHeader(flags).CopyTo(file, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(12), 0x20_0000);  // header_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(16), 0x20_0000);  // load_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(20), 0);          // load_end_addr: whole file
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(24), 0x20_1000);  // bss_end_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(28), 0x20_0020);  // entry
        file[0x20] = 0xF4;
        var boot = new MultibootImage(file, "k", []).Load(memory);
        Assert.Equal(0x20_0020UL, boot.Registers!.Rip);
        var at = new byte[1];
        memory.Read(new GuestPhysAddr(0x20_0020), at);
        Assert.Equal(0xF4, at[0]);
    }

    [Theory]
    [InlineData("no header")]
    [InlineData("video")]
    [InlineData("truncated")]
    [InlineData("segment outside file")]
    [InlineData("boot area")]
    [InlineData("beyond ram")]
    public void Malformed_or_unsupported_kernels_are_refused_clearly(string kind)
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        var kernel = Kernel();
        switch (kind)
        {
            case "no header":
                kernel = TestElf.Build(new byte[64], KernelAddress, KernelAddress);
                break;
            case "video":
                kernel = Kernel(flags: 0b111);
                break;
            case "truncated":
                kernel = kernel[..48].Concat(TestElf.MultibootHeader()).ToArray();
                break;
            case "segment outside file":
                BinaryPrimitives.WriteUInt32LittleEndian(kernel.AsSpan(TestElf.HeaderSize + 16), 1_000_000);
                break;
            case "boot area":
                kernel = TestElf.Build([.. TestElf.MultibootHeader(), 0xF4], 0x2000, 0x200C);
                break;
            case "beyond ram":
                kernel = TestElf.Build([.. TestElf.MultibootHeader(), 0xF4], 0x0200_0000, 0x0200_000C);
                break;
        }
        var e = Assert.Throws<BootException>(() => new MultibootImage(kernel, "k", []).Load(memory));
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
        Assert.DoesNotContain("Exception", e.Message);
    }

    [Fact]
    public void Kernel_kinds_are_recognised_by_their_contents()
    {
        Assert.IsType<MultibootImage>(KernelKind.Recognise(Kernel(), "k", "", null));
        Assert.IsType<LinuxImage>(KernelKind.Recognise(TestBzImage.Build(), "bz", "console=ttyS0", null));
        var bz = new byte[0x400];
        Encoding.ASCII.GetBytes("HdrS").CopyTo(bz, 0x202);
        Assert.Contains("setup header", Assert.Throws<BootException>(() => KernelKind.Recognise(bz, "bz", "", null)).Message);
        var elf = TestElf.Build(new byte[16], KernelAddress, KernelAddress);
        Assert.Contains("without a multiboot header", Assert.Throws<BootException>(() => KernelKind.Recognise(elf, "e", "", null)).Message);
        Assert.Contains("not a kernel", Assert.Throws<BootException>(() => KernelKind.Recognise(new byte[100], "x", "", null)).Message);
    }
}
